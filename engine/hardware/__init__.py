"""The machine a job runs on (torch-free).

gpus       GPU probing (NVML), the per-step monitor, the thermal guard
installed  which optional extras are installed, and the command that adds one
"""
