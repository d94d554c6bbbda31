"""The worker: runs the job described by ``<job_dir>/spec.json`` and records it in the job folder.

It waits for its device's lock (an OS file lock, released by the kernel even if the worker is
killed), emits ``started``, dispatches on the spec's kind, and always ends the log with a
``finished`` event and ``result.json`` — on failure after an ``error`` event that names the
exception type and says what to do.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from engine.events import ErrorEvent, EventWriter, Finished, Queued, Started
from engine.files import backprop_home
from engine.jobs import JobCancelled, resume_command
from engine.models import privacy_environment
from engine.reporting import reporting
from engine.spec import CANCEL_FILE, EVENTS_FILE, ExportSpec, JobResult, read_spec, write_result


def device_lock_paths(spec: Any) -> list[Path]:
    """One lock per device: ``gpu-N`` on a GPU machine, ``cpu`` otherwise; every card a job uses.

    Every job that may touch a GPU holds them, export included (its merge and its parity check run on
    CUDA when one is present), so an export never collides with a training job on the same card.
    A job on several cards takes their locks in sorted order, so two such jobs cannot deadlock.
    """
    from engine.hardware import probe_gpus
    from engine.training.distributed import job_devices

    device = "auto" if isinstance(spec, ExportSpec) else spec.device
    gpu_index = 0 if isinstance(spec, ExportSpec) else spec.gpu_index
    wants_gpu = device != "cpu" and probe_gpus().available
    names = [f"gpu-{i}" for i in (job_devices(spec) or [gpu_index])] if wants_gpu else ["cpu"]
    root = backprop_home() / "locks"
    root.mkdir(parents=True, exist_ok=True)
    return [root / f"{name}.lock" for name in names]


def _hint(exc: BaseException) -> str:
    """A next step for the errors users meet most."""
    name = type(exc).__name__
    if name == "PreflightError":
        return "Fix the setting or data named, then start the job again."
    if name == "DatasetError":
        return "Fix the rows listed (or set skip_bad_rows) and start the job again."
    if name == "DoesNotFitError":
        return "Lower micro_batch_size or max_seq_length, use quantization '4bit', or pick a smaller model."
    if name in ("OutOfMemoryError",) or "out of memory" in str(exc).lower():
        return "Lower max_seq_length or micro_batch_size, or use quantization '4bit'."
    if isinstance(exc, (FileNotFoundError, OSError)):
        return "Check that the paths and model names in the job's settings exist on this machine."
    return f"See {Path('worker.log')} in the job folder for the full traceback."


def run_job(job_dir: str | Path, *, lock_poll_s: float = 0.5) -> int:
    """Run one job to its end. Returns the process exit code (0 succeeded, 1 failed, 2 cancelled)."""
    job_dir = Path(job_dir).resolve()
    privacy_environment()  # before anything imports huggingface_hub
    events = EventWriter(job_dir / EVENTS_FILE)
    cancel_file = job_dir / CANCEL_FILE

    def cancel_requested() -> bool:
        return cancel_file.exists()

    kind = "unknown"
    locks: list[FileLock] = []
    try:
        spec = read_spec(job_dir)
        kind = spec.kind
        lock_paths = device_lock_paths(spec)
        for lock_path in lock_paths:
            lock = FileLock(str(lock_path))
            locks.append(lock)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                events.emit(Queued(message=f"waiting for {lock_path.stem} (another job is using it)"))
                while True:
                    if cancel_requested():
                        raise JobCancelled("cancelled while queued") from None
                    try:
                        lock.acquire(timeout=lock_poll_s)
                        break
                    except Timeout:
                        continue
        events.emit(Started(kind=kind, pid=os.getpid(), device_lock="+".join(p.stem for p in lock_paths)))
        from engine.training.distributed import job_devices, run_ranks

        if devices := job_devices(spec):  # several devices: the ranks run the job (and report)
            result = run_ranks(job_dir, devices, events)
        else:
            with reporting(spec, job_dir, events):  # TensorBoard / W&B when train.report_to asks
                result = _dispatch(spec, job_dir, events, cancel_requested)
        write_result(job_dir, result)
        events.emit(Finished(status=result.status, metrics=result.metrics, artifacts=result.artifacts))
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the event log
        cancelled = isinstance(exc, (JobCancelled, KeyboardInterrupt))
        traceback.print_exc(file=sys.stderr)
        if cancelled:
            result = JobResult(
                status="cancelled", kind=kind, error={"type": "Cancelled", "message": str(exc)}
            )
        else:
            message = str(exc) or type(exc).__name__
            error = getattr(exc, "job_error", None)  # a rank's own error (RankFailed)
            error = error or {"type": type(exc).__name__, "message": message, "hint": _hint(exc)}
            events.emit(ErrorEvent(exception=error["type"], message=error["message"], hint=error["hint"]))
            result = JobResult(status="failed", kind=kind, error=error)
        write_result(job_dir, result)
        resume = resume_command(job_dir) if cancelled and kind != "export" else None
        events.emit(Finished(status=result.status, error=result.error, resume_command=resume))
        return 2 if cancelled else 1
    finally:
        for lock in reversed(locks):
            if lock.is_locked:
                lock.release()
        events.close()


def _dispatch(spec: Any, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool]) -> JobResult:
    t0 = time.time()
    from engine.preflight import preflight

    for note in preflight(spec, "python"):  # the same checks the server and the CLI ran
        events.log(note)
    if spec.kind == "finetune":
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
