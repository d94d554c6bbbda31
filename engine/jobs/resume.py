"""What a stopped job will resume from, and whether its worker is still alive (torch-free).

``engine.jobs.runner.prepare_resume`` makes a stopped job runnable again; this module tells the user what
that run will continue from before it starts: checkpoints are found by their folder names and a
series' committed runs by its ``state.json``, without loading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil

from engine.contract.events import Progress, Started, iter_events
from engine.contract.spec import CHECKPOINT_DIR, EVENTS_FILE, read_spec

SERIES_STATE = Path("series") / "state.json"  # engine.series commits its finished runs here
STEP_PREFIX = "step-"  # engine.checkpoints names each checkpoint step-000120


def _newest_step(checkpoints: Path) -> int | None:
    steps = [
        int(p.name.removeprefix(STEP_PREFIX))
        for p in checkpoints.glob(f"{STEP_PREFIX}*")
        if (p / "state.json").is_file() and p.name.removeprefix(STEP_PREFIX).isdigit()
    ]
    return max(steps) if steps else None


def running_worker(job_dir: Path) -> int | None:
    """The pid of the job's worker when it is still running (a worker of this job, not a reused pid)."""
    started: Started | None = None
    for event in iter_events(job_dir / EVENTS_FILE):
        if isinstance(event, Started):
            started = event
    if started is None:
        return None
    try:
        proc = psutil.Process(started.pid)
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        return started.pid if alive and proc.create_time() <= started.time + 1 else None
    except psutil.Error:
        return None


def resume_point(job_dir: Path) -> str:
    """'from the checkpoint at step 12 of 30' (or which run of a series), without loading anything."""
    spec = read_spec(job_dir)
    if spec.kind == "export":
        return "an export keeps no checkpoints: it runs again from the start"
    if spec.kind == "slao_series":
        state_file = job_dir / SERIES_STATE
        done = int(json.loads(state_file.read_text())["completed_runs"]) if state_file.is_file() else 0
        step = _newest_step(job_dir / CHECKPOINT_DIR / f"run-{done + 1:03d}")
        where = f"from its checkpoint at step {step}" if step else "from its start"
        return f"{done} run(s) finished; run {done + 1} continues {where}"
    step = _newest_step(job_dir / CHECKPOINT_DIR)
    if step is None:
        return "no checkpoint was written: training starts again from step 0"
    totals = [
        e.total for e in iter_events(job_dir / EVENTS_FILE) if isinstance(e, Progress) and e.loss is not None
    ]
    return f"from the checkpoint at step {step}" + (f" of {totals[-1]}" if totals else "")
