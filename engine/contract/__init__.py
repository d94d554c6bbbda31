"""The contract between the server, the front-ends and a job's worker (torch-free, the lowest layer)."""
