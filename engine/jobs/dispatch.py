"""One job's recipe, chosen by its spec's kind, and the next step shown with an error.

Shared by the worker (one device) and each rank of a job on several devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.contract.events import EventWriter
from engine.contract.spec import JobResult
from engine.planning.preflight import preflight


def error_hint(exc: BaseException) -> str:
    """A next step for the errors users meet most."""
    name = type(exc).__name__
    if name == "PreflightError":
        return "Fix the setting or data named, then start the job again."
    if name == "DatasetError":
        return "Fix the rows listed (or set skip_bad_rows) and start the job again."
    if name == "RewardCodeError":
        return "Fix the reward file at the line named (or its return value), then start the job again."
    if name == "DoesNotFitError":
        return "Lower micro_batch_size or max_seq_length, use quantization '4bit', or pick a smaller model."
    if name in ("OutOfMemoryError",) or "out of memory" in str(exc).lower():
        return "Lower max_seq_length or micro_batch_size, or use quantization '4bit'."
    if isinstance(exc, (FileNotFoundError, OSError)):
        return "Check that the paths and model names in the job's settings exist on this machine."
    return f"See {Path('worker.log')} in the job folder for the full traceback."


def run_recipe(spec: Any, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool]) -> JobResult:
    """Run ``spec``'s recipe in ``job_dir`` after the checks every caller ran; its result, with the wall time.

    Each recipe is imported when its kind comes (not at the top): it brings torch and its own stack,
    and a job loads only its own.
    """
    t0 = time.time()
    for note in preflight(spec, "python"):  # the same checks the server and the CLI ran
        events.log(note)
    if spec.kind == "finetune" and spec.method == "grpo":
        from engine.recipes.grpo import run_grpo  # each recipe with its kind (docstring)

        result = run_grpo(spec, job_dir, events, cancel_check)
    elif spec.kind == "finetune" and spec.method != "sft":
        from engine.recipes.preference import run_preference  # each recipe with its kind (docstring)

        result = run_preference(spec, job_dir, events, cancel_check)
    elif spec.kind == "finetune":
        from engine.recipes.finetune import run_finetune

        result = run_finetune(spec, job_dir, events, cancel_check)
    elif spec.kind == "slao_series":
        from engine.recipes.series import run_series

        result = run_series(spec, job_dir, events, cancel_check)
    elif spec.kind == "export":
        from engine.export.run import run_export

        result = run_export(spec, job_dir, events, cancel_check)
    else:  # pragma: no cover - the spec union rules this out
        raise ValueError(f"unknown job kind {spec.kind!r}")
    result.metrics.setdefault("wall_seconds", round(time.time() - t0, 2))
    return result
