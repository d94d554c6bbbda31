"""Jobs as processes: the job folder, the worker that runs a recipe in it, and its companions.

runner         job folders, starting a detached worker, following it, cancel, resume
processes      process identity, detached spawn, kill tree (the platform-specific calls)
worker         ``python -m engine run <job_dir>``: device locks, the recipe, error/finished events
dispatch       one spec to its recipe, and the hint shown with an error
rank_launcher  a job on several devices: torchrun launch, one rank's run, the ranks' outcome
resume         what a stopped job will resume from
reporting      TensorBoard and W&B files fed by the event writer
commands       ``python -m engine check-data|generate '<json>'``: one JSON object out
progress       a running job's progress bar on a terminal (the CLI and the Python API)
"""
