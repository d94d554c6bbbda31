"""Getting a stopped job folder ready to run again, and saying what it will resume from.

A job stopped by a cancel (or a crash) keeps its checkpoints; running its worker again on the
same folder continues from the newest one (``train_adapter`` and ``run_series`` look for them).
Before that, the folder must lose what marks it ended: ``cancel.request`` (else the worker stops
at once) and ``result.json`` (else a follower would read the old result). Torch-free: checkpoints
are found by their folder names and ``state.json`` files, not loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from engine.events import iter_events
from engine.spec import CANCEL_FILE, CHECKPOINT_DIR, EVENTS_FILE, RESULT_FILE, read_result, read_spec

SERIES_STATE = Path("series") / "state.json"  # engine.series keeps its committed runs here


class ResumeError(ValueError):
    """The job can't be resumed; the message says why and what to do instead."""


def _newest_step(checkpoints: Path) -> int | None:
    steps = [int(p.name.split("-")[1]) for p in checkpoints.glob("step-*") if (p / "state.json").is_file()]
    return max(steps) if steps else None


def _last_total(job_dir: Path) -> int | None:
    total = None
    for event in iter_events(job_dir / EVENTS_FILE):
        if event.type == "progress" and "loss" in event.data:
            total = event.data.get("total", total)
    return total


def _still_running(job_dir: Path) -> int | None:
    """The pid of the job's worker when it is alive and has not finished."""
    pid, finished = None, False
    for event in iter_events(job_dir / EVENTS_FILE):
        if event.type == "started":
            pid, finished = event.data.get("pid"), False
        elif event.type == "finished":
            finished = True
    if pid is None or finished or not psutil.pid_exists(int(pid)):
        return None
    return int(pid)


def describe_resume_point(job_dir: Path) -> str:
    """'from the checkpoint at step 12 of 30' (or which run of a series), without loading anything."""
    spec = read_spec(job_dir)
    if spec.kind == "export":
        return "an export has no checkpoints: it runs again from the start"
    if spec.kind == "slao_series":
        state_file = job_dir / SERIES_STATE
        done = json.loads(state_file.read_text())["completed_runs"] if state_file.is_file() else 0
        run = done + 1
        step = _newest_step(job_dir / CHECKPOINT_DIR / f"run-{run:03d}")
        where = f"from the checkpoint at step {step}" if step else "from its start"
        return f"{done} run(s) finished; run {run} continues {where}"
    step = _newest_step(job_dir / CHECKPOINT_DIR)
    if step is None:
        return "no checkpoint was written: training starts again from step 0"
    total = _last_total(job_dir)
    return f"from the checkpoint at step {step}" + (f" of {total}" if total else "")


def prepare_resume(job_dir: Path) -> str:
    """Clear the markers of the job's end; returns what it will resume from. Raises ``ResumeError``."""
    result = read_result(job_dir)
    if result is not None and result.status == "succeeded":
        raise ResumeError(
            f"job {job_dir.name} already finished successfully; there is nothing to resume "
            f"(export it with: backprop export {job_dir.name})"
        )
    pid = _still_running(job_dir)
    if result is None and pid is not None:
        raise ResumeError(f"job {job_dir.name} is still running (worker pid {pid}); stop it first")
    what = describe_resume_point(job_dir)
    (job_dir / CANCEL_FILE).unlink(missing_ok=True)
    (job_dir / RESULT_FILE).unlink(missing_ok=True)
    previous = f"it had {result.status}" if result else "it had stopped without a result"
    return f"{previous}; {what}"
