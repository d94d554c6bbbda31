"""What a job will need, decided before any weights load (torch-free)."""
