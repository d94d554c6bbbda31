"""What a job will need, decided before any weights load (torch-free).

memory      the memory estimate of one training step; the largest micro-batch that fits
defaults    smart defaults, each with its reason: the resolved plan the loop runs (ResolvedTraining)
fitting     a run fitted into free memory: DoesNotFitError with checked suggestions, recompute, offload
preflight   the checks before a job exists (model, dataset rows, fit), for every caller
gpu_report  what inspect_gpu / ``backprop gpu`` report: cards and the presets that fit them
"""
