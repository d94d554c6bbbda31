"""One job's recipe, chosen by its spec's kind, and the next step shown with an error.

Shared by the worker (one device) and each rank of a job on several devices.
"""

from __future__ import annotations

import gc
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


def run_recipe(
    spec: Any,
    job_dir: Path,
    events: EventWriter,
    cancel_check: Callable[[], bool],
    *,
    own_process: bool = False,
) -> JobResult:
    """Run ``spec``'s recipe in ``job_dir`` after the checks every caller ran; its result, with the wall time.

    Each recipe is imported when its kind comes (not at the top): it brings torch and its own stack,
    and a job loads only its own. ``own_process``: this process runs this one job and ends (a worker, a
    rank), so what the imports made may be frozen out of the garbage collector (below).
    """
    t0 = time.time()
    for note in preflight(spec, "python"):  # the same checks the server and the CLI ran
        events.log(note)
    recipe = _recipe(spec)
    if own_process:
        # The imports made millions of objects that live as long as the process; frozen, they are left out
        # of the garbage collector's full passes, which otherwise walk all of them (0.1-0.35 s each on a
        # CPU machine, several times during a job's start-up and steps).
        gc.freeze()
    result = recipe(spec, job_dir, events, cancel_check)
    result.metrics.setdefault("wall_seconds", round(time.time() - t0, 2))
    return result


def _recipe(spec: Any) -> Callable[[Any, Path, EventWriter, Callable[[], bool]], JobResult]:
    """The recipe of ``spec``'s kind (and method), imported now."""
    if spec.kind == "finetune" and spec.method == "grpo":
        from engine.recipes.grpo import run_grpo  # each recipe with its kind (run_recipe's docstring)

        return run_grpo
    if spec.kind == "finetune" and spec.method != "sft":
        from engine.recipes.preference import run_preference

        return run_preference
    if spec.kind == "finetune":
        from engine.recipes.finetune import run_finetune

        return run_finetune
    if spec.kind == "slao_series":
        from engine.recipes.series import run_series

        return run_series
    if spec.kind == "export":
        from engine.export.run import run_export

        return run_export
    raise ValueError(f"unknown job kind {spec.kind!r}")  # pragma: no cover - the spec union rules this out
