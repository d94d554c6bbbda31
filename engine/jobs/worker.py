"""The worker: runs the job described by ``<job_dir>/spec.json`` and records it in the job folder.

It waits for its device's lock (an OS file lock, released by the kernel even if the worker is
killed), emits ``started``, dispatches on the spec's kind, and always ends the log with a
``finished`` event and ``result.json`` — on failure after an ``error`` event that names the
exception type and says what to do.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from engine.contract.errors import JobCancelled
from engine.contract.events import ErrorEvent, EventWriter, Finished, Queued, Started
from engine.contract.files import backprop_home
from engine.contract.spec import (
    CANCEL_FILE,
    EVENTS_FILE,
    ExportSpec,
    JobResult,
    read_spec,
    running_artifacts,
    write_result,
)
from engine.jobs.dispatch import error_hint, run_recipe
from engine.jobs.rank_launcher import job_devices, run_ranks
from engine.jobs.reporting import reporting
from engine.jobs.runner import resume_command
from engine.models.presets import privacy_environment
from engine.training import quantized_cache


def device_lock_paths(spec: Any) -> list[Path]:
    """One lock per device: ``gpu-N`` on a GPU machine, ``cpu`` otherwise; every card a job uses.

    Every job that may touch a GPU holds them, export included (its merge and its parity check run on
    CUDA when one is present), so an export never collides with a training job on the same card.
    A job on several cards takes their locks in sorted order, so two such jobs cannot deadlock.
    """
    from engine.hardware.gpus import probe_gpus  # looked up at call time (tests replace it)

    device = "auto" if isinstance(spec, ExportSpec) else spec.device
    gpu_index = 0 if isinstance(spec, ExportSpec) else spec.gpu_index
    wants_gpu = device != "cpu" and probe_gpus().available
    names = [f"gpu-{i}" for i in (job_devices(spec) or [gpu_index])] if wants_gpu else ["cpu"]
    root = backprop_home() / "locks"
    root.mkdir(parents=True, exist_ok=True)
    return [root / f"{name}.lock" for name in names]


def run_job(job_dir: str | Path, *, lock_poll_s: float = 0.5, notes: list[str] | None = None) -> int:
    """Run one job to its end. Returns the process exit code (0 succeeded, 1 failed, 2 cancelled).

    ``notes``: lines logged right after ``started`` (a warm worker says how it was started).
    """
    job_dir = Path(job_dir).resolve()
    privacy_environment()  # before anything imports huggingface_hub
    events = EventWriter(job_dir / EVENTS_FILE)
    cancel_file = job_dir / CANCEL_FILE

    def cancel_requested() -> bool:
        return cancel_file.exists()

    kind = "unknown"
    locks: list[FileLock] = []
    quantized_cache.plan_copies_in_this_process()
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
        for note in notes or []:
            events.log(note)
        if devices := job_devices(spec):  # several devices: the ranks run the job (and report)
            result = run_ranks(job_dir, devices, events)
        else:
            with reporting(spec, job_dir, events):  # TensorBoard / W&B when train.report_to asks
                result = run_recipe(spec, job_dir, events, cancel_requested, own_process=True)
        write_result(job_dir, result)
        events.emit(Finished(status=result.status, metrics=result.metrics, artifacts=result.artifacts))
        return 0
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the event log
        cancelled = isinstance(exc, (JobCancelled, KeyboardInterrupt))
        traceback.print_exc(file=sys.stderr)
        kept = running_artifacts(job_dir)  # what the job wrote before it stopped (GRPO's completions)
        if cancelled:
            result = JobResult(
                status="cancelled",
                kind=kind,
                error={"type": "Cancelled", "message": str(exc)},
                artifacts=kept,
            )
        else:
            message = str(exc) or type(exc).__name__
            error = getattr(exc, "job_error", None)  # a rank's own error (RankFailed)
            error = error or {"type": type(exc).__name__, "message": message, "hint": error_hint(exc)}
            events.emit(ErrorEvent(exception=error["type"], message=error["message"], hint=error["hint"]))
            result = JobResult(status="failed", kind=kind, error=error, artifacts=kept)
        write_result(job_dir, result)
        resume = resume_command(job_dir) if cancelled and kind != "export" else None
        events.emit(Finished(status=result.status, error=result.error, resume_command=resume))
        return 2 if cancelled else 1
    finally:
        quantized_cache.move_to_host()  # a kept 4-bit copy's weights leave the card before the lock goes
        for lock in reversed(locks):
            if lock.is_locked:
                lock.release()
        events.close()
        quantized_cache.write_pending()  # the disk write does not keep the next job waiting
