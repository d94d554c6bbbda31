"""The one job runner (torch-free): create a job folder, start its worker, follow it, cancel, resume.

The CLI, the Python API and the server all start workers through ``start_worker``: ``python -P -m
engine run <job_dir>`` in the job folder, so neither the caller's folder nor the job folder is on
``sys.path`` (a user's own ``engine/`` package can never be imported in place of ours), and in its
own process session (``processes.spawn_detached``), so a Ctrl-C in a terminal reaches only the
caller, which asks the worker to stop gracefully (``run_and_follow``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from engine.contract.events import Event, read_events
from engine.contract.files import atomic_write_text, backprop_home, local_or_name
from engine.contract.spec import (
    CANCEL_FILE,
    EVENTS_FILE,
    RESULT_FILE,
    WORKER_LOG,
    JobResult,
    read_result,
    read_spec,
    write_result,
    write_spec,
)
from engine.jobs import processes as procs

_KIND_PREFIX = {"finetune": "ft", "slao_series": "slao", "export": "exp"}


def new_job_id(kind: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
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


def find_job_dir(job: str | Path, workdir: Path | None = None) -> Path:
    """A job given as its folder, or as its id under ``workdir`` (where the caller keeps its jobs) or the
    state folder."""
    path = Path(job).expanduser()
    roots = [workdir] if workdir is not None else []
    for candidate in (path, *(root / str(job) for root in [*roots, jobs_root()])):
        if (candidate / "spec.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no job {str(job)[:200]!r}: give a job folder or a job id under {jobs_root()}")


def init_adapter_path(value: str, workdir: Path | None = None) -> str:
    """``init_adapter`` as the command line and the Python API take it (a finished job's id or folder, or an
    adapter folder), as the absolute folder the worker reads: it runs in its job's folder, where neither an id
    nor a relative path means anything. What names nothing is left as given, for the preflight to explain."""
    with contextlib.suppress(FileNotFoundError):
        return str(find_job_dir(value, workdir))
    return local_or_name(value)


# -- the worker process -------------------------------------------------------------------------


_DEFAULT_ENGINE = [sys.executable, "-P", "-m", "engine"]


def worker_command() -> list[str]:
    """The argv that runs a job's worker; the job folder is appended.

    ``BACKPROP_WORKER_COMMAND`` (a JSON list) overrides it, e.g. to train with another Python
    environment than the caller's: ``["/opt/train/bin/python", "-P", "-m", "engine", "run"]``.
    """
    raw = os.environ.get("BACKPROP_WORKER_COMMAND")
    if not raw:
        return [*_DEFAULT_ENGINE, "run"]
    try:
        argv = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"BACKPROP_WORKER_COMMAND must be a JSON list of strings: {exc}") from exc
    if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
        raise ValueError(
            'BACKPROP_WORKER_COMMAND must be a JSON list of strings, e.g. ["python", "-m", "engine", "run"]'
        )
    return argv


def engine_command() -> list[str]:
    """The argv prefix of ``python -m engine`` for the one-shot verbs (check-data, generate).

    The worker command without its ``run`` verb when it ends with one (the same environment),
    else this Python's engine.
    """
    worker = worker_command()
    return worker[:-1] if worker[-1] == "run" else list(_DEFAULT_ENGINE)


def worker_env(home: Path | None = None) -> dict[str, str]:
    """The environment of an engine subprocess: the caller's, plus what the engine must share.

    The worker must import the same ``engine`` package as its caller (even from a source
    checkout), and use the same state folder (its device locks live there).
    """
    env = dict(os.environ)
    if home is not None:
        env["BACKPROP_HOME"] = str(home)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(
        [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_worker(
    job_dir: Path, *, home: Path | None = None, command: list[str] | None = None
) -> tuple[subprocess.Popen[bytes], procs.ProcessIdentity]:
    """Start the job's worker detached (own session); returns the Popen and the process identity.

    ``command`` replaces ``python -P -m engine run`` (the server's tests run a stand-in worker).
    """
    return procs.spawn_detached(
        [*(command or worker_command()), str(job_dir)],
        cwd=job_dir,
        stderr_path=job_dir / WORKER_LOG,
        env=worker_env(home),
    )


# -- cancel and resume --------------------------------------------------------------------------


def request_cancel(job_dir: Path) -> None:
    """Ask the worker to checkpoint and stop at its next safe point (a file: no signals needed)."""
    atomic_write_text(job_dir / CANCEL_FILE, json.dumps({"requested_at": time.time()}))


def resume_command(job_dir: Path) -> str:
    return f"backprop resume {job_dir}"


def prepare_resume(job_dir: Path) -> JobResult | None:
    """Make a stopped job runnable again: forget the old cancel request and its result.

    Returns the result it ended with. Training continues from the last checkpoint (a series from
    its last finished run), and the event log keeps counting.
    """
    previous = read_result(job_dir)
    if previous is not None and previous.status == "succeeded":
        raise ValueError(f"job {job_dir.name} already succeeded; there is nothing to resume")
    (job_dir / CANCEL_FILE).unlink(missing_ok=True)
    (job_dir / RESULT_FILE).unlink(missing_ok=True)
    return previous


# -- following a job in the foreground (CLI, API) ------------------------------------------------


def run_and_follow(
    job_dir: Path,
    on_event: Callable[[Event], None],
    *,
    poll_s: float = 0.2,
    on_interrupt: Callable[[str], None] | None = None,
) -> JobResult:
    """Run the job's worker and call ``on_event`` for each event until it ends.

    A first Ctrl-C asks the worker to stop cleanly (it checkpoints, then ends ``cancelled``); a
    second one kills it (the last checkpoint stays). ``on_interrupt`` hears what is happening.
    """
    say = on_interrupt or (lambda text: print(text, file=sys.stderr, flush=True))
    proc, identity = start_worker(job_dir)
    offset = 0
    interrupts = 0
    while True:
        try:
            done = proc.poll() is not None
            events, offset = read_events(job_dir / EVENTS_FILE, offset)
            for event in events:
                on_event(event)
            if done:
                break
            time.sleep(poll_s)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                request_cancel(job_dir)
                say("stopping: the job saves a checkpoint at its next step (Ctrl-C again to kill it now)")
            else:
                procs.kill_tree(identity)
                say("killed; the job's last checkpoint is kept")
    result = read_result(job_dir)
    if result is None and interrupts > 1:
        result = JobResult(
            status="cancelled",
            kind=read_spec(job_dir).kind,
            error={"type": "Killed", "message": "killed by a second Ctrl-C", "hint": resume_command(job_dir)},
        )
        write_result(job_dir, result)
    if result is None:
        tail = (job_dir / WORKER_LOG).read_text(errors="replace")[-2000:]
        raise RuntimeError(
            f"the worker exited with code {proc.returncode} without a result; its log ends with:\n{tail}"
        )
    return result
