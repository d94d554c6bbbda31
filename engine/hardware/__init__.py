"""The machine a job runs on (torch-free): GPUs through NVML, installed extras."""
