"""Creating job folders and following a running job's events (torch-free).

Used by the CLI and the Python API; the server keeps its own index (SQLite) on top of the same
job folders.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from engine.events import Event, read_events
from engine.files import backprop_home
from engine.spec import CANCEL_FILE, EVENTS_FILE, WORKER_LOG, JobResult, read_result, write_spec


class JobCancelled(Exception):
    """The user asked the job to stop (``cancel.request``); raised at a safe point (after a checkpoint)."""


_KIND_PREFIX = {"finetune": "ft", "slao_series": "slao", "export": "exp"}


def new_job_id(kind: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{_KIND_PREFIX.get(kind, 'job')}-{stamp}-{secrets.token_hex(3)}"


def jobs_root() -> Path:
    return backprop_home() / "jobs"


def create_job(spec: BaseModel, root: Path | None = None, job_id: str | None = None) -> Path:
    """A new job folder holding the validated ``spec.json``."""
    job_id = job_id or new_job_id(getattr(spec, "kind", "job"))
    job_dir = (root or jobs_root()) / job_id
    job_dir.mkdir(parents=True, exist_ok=False)
    write_spec(job_dir, spec)
    return job_dir


def request_cancel(job_dir: Path) -> None:
    (job_dir / CANCEL_FILE).touch()


def run_and_follow(job_dir: Path, on_event: Callable[[Event], None], poll_s: float = 0.2) -> JobResult:
    """Run the job in a child process (``python -m engine run``) and call ``on_event`` for each event.

    Ctrl-C asks the job to stop cleanly (it checkpoints), then waits for it.
    """
    with open(job_dir / WORKER_LOG, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "run", str(job_dir)], stdout=subprocess.DEVNULL, stderr=log
        )
    offset = 0
    try:
        while True:
            done = proc.poll() is not None
            events, offset = read_events(job_dir / EVENTS_FILE, offset)
            for event in events:
                on_event(event)
            if done:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        request_cancel(job_dir)
        proc.wait()
        events, offset = read_events(job_dir / EVENTS_FILE, offset)
        for event in events:
            on_event(event)
    result = read_result(job_dir)
    if result is None:
        tail = (job_dir / WORKER_LOG).read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"the worker exited with code {proc.returncode} without a result; its log ends with:\n{tail}"
        )
    return result
