"""Rewards for GRPO jobs: the built-in ones, the user's own file, and their weighted sum (torch-free).

A reward function is called as trl's GRPOTrainer calls one, so a function written for trl works here:
``f(prompts, completions, completion_ids=..., **columns) -> list[float | None]`` with one prompt and one
completion per sampled completion (each prompt repeated once per completion of its group); completions
are strings for text prompts and ``[{"role": "assistant", "content": ...}]`` for message prompts; every
other column of the dataset's rows arrives by name (``answer=[...]``). ``None`` means "does not apply"
(trl: NaN, left out of the sums).

builtin     answer (extracted answer equals the row's), format (regex), json (valid, optionally against a
            JSON Schema), length (DAPO's soft overlong punishment)
user_code   the user's Python file: loaded in the worker; its errors name the file and line
scoring     the rewards of a job's spec, called in turn and summed with their weights

Why a package of its own, beside engine.data: rewards read rows and text only, so the torch-free
preflight (engine.planning) can check a job's rewards against its dataset before anything loads, and
the training step (engine.training) calls the same code on the completions.
"""
