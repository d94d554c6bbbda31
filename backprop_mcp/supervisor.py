"""Starting workers, following them, and deciding each job's state.

A job's state is derived, never guessed: ``result.json`` (or a ``finished`` event) says how a job
ended; otherwise a live worker (pid *and* start time match) is ``running`` once it has emitted
``started`` and ``queued`` before that (it waits for its GPU lock); a worker that is gone
without finishing is ``failed`` with the reason found in its event log or its stderr, or
``cancelled`` when a cancel had been asked for. Any server process sharing the state folder
derives the same answer, and the store's compare-and-set keeps final states final.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from backprop_mcp.job_events import JobTail, describe_error
from backprop_mcp.store import TERMINAL_STATES, JobRecord, JobStore
from engine.interface import (
    EVENTS_FILE,
    WORKER_LOG,
    JobResult,
    JobState,
    WarmPool,
    create_job,
    procs,
    read_result,
    request_cancel,
    start_worker,
)

log = logging.getLogger(__name__)

# A freshly created job has no pid for the instant between its row and its spawn; another server
# reading the store then must not call it dead.
_SPAWN_GRACE_S = 30.0
DEFAULT_CANCEL_GRACE_S = 90.0


@dataclass
class Refresh:
    record: JobRecord
    new_events: int
    state_changed: bool


class Supervisor:
    def __init__(
        self,
        home: Path,
        store: JobStore,
        *,
        worker_command: list[str] | None = None,
        cancel_grace_s: float | None = None,
    ):
        self.home = home
        self.jobs_dir = home / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.worker_command = worker_command  # None: python -P -m engine run (engine.jobs.runner)
        # With the engine's own worker: one kept warm for the next job (engine.jobs.warm_worker)
        self.warm = WarmPool(home) if worker_command is None else None
        env_grace = os.environ.get("BACKPROP_CANCEL_GRACE_S")
        self.cancel_grace_s = (
            cancel_grace_s if cancel_grace_s is not None else float(env_grace or DEFAULT_CANCEL_GRACE_S)
        )
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._tails: dict[str, JobTail] = {}
        self._lock = threading.RLock()  # tails and children are touched from several threads
        # Why this server is killing a job's worker, while it does: a refresh on another thread that
        # finds the worker gone before force_stop records the end must record the same reason.
        self._stop_reasons: dict[str, str] = {}

    # -- creating jobs -------------------------------------------------------------------------

    def start_job(self, spec: BaseModel, *, label: str) -> JobRecord:
        """Create the job's folder (the engine's ``create_job``), index it, and start its worker detached."""
        kind = str(getattr(spec, "kind"))  # noqa: B009 - every JobSpec has a kind
        job_dir = create_job(spec, root=self.jobs_dir)
        job_id = job_dir.name
        self.store.create(job_id, kind, job_dir, label)
        try:
            warm = self.warm.take(job_dir) if self.warm is not None else None
            proc, identity = warm or start_worker(job_dir, home=self.home, command=self.worker_command)
        except OSError as exc:
            self.store.transition(
                job_id, "failed", error=f"could not start the worker: {exc}", finished_at=time.time()
            )
            raise
        with self._lock:
            self._children[job_id] = proc
        self.store.set_process(job_id, identity.pid, identity.start_time)
        log.info("started job %s (pid %d)", job_id, identity.pid)
        record = self.store.get(job_id)
        assert record is not None
        return record

    def keep_worker_warm(self) -> None:
        """Start a warm worker where none waits (the watcher calls this; engine.jobs.warm_worker)."""
        if self.warm is not None:
            self.warm.keep_warm()

    # -- following jobs -----------------------------------------------------------------------

    def tail(self, record: JobRecord) -> JobTail:
        with self._lock:
            tail = self._tails.get(record.id)
            if tail is None:
                tail = self._tails[record.id] = JobTail(record.job_dir / EVENTS_FILE)
            return tail

    def _reap(self, job_id: str) -> int | None:
        """Collect our own child's exit status (so it is no zombie); None while it runs."""
        with self._lock:
            proc = self._children.get(job_id)
            if proc is None:
                return None
            code = proc.poll()
            if code is not None:
                del self._children[job_id]
            return code

    def refresh(self, record: JobRecord) -> Refresh:
        """Read a job's new events and bring its stored state up to date."""
        with self._lock:
            tail = self.tail(record)
            fresh = tail.poll()
        if record.is_terminal:
            record = self._reopen_if_resumed(record, tail)
            if record.is_terminal:
                return Refresh(record, len(fresh), False)
        record = self._adopt_worker(record, tail)
        exit_code = self._reap(record.id)
        state, error = self._derive_state(record, tail, exit_code)
        now = time.time()
        changed = self.store.transition(
            record.id,
            state,
            error=error,
            started_at=tail.started.time if tail.started else None,
            finished_at=now if state in TERMINAL_STATES else None,
        )
        if changed:
            log.info("job %s is now %s%s", record.id, state, f" ({error})" if error else "")
        # Always read back what the store holds, never return ``record`` as it was passed in: it
        # may predate a transition made meanwhile by another thread of this server (the watcher
        # polls the same tail, so this call then sees no new events and changes nothing) or by
        # another server, and a final state may have raced with another server.
        updated = self.store.get(record.id)
        return Refresh(updated or record, len(fresh), changed)

    def _adopt_worker(self, record: JobRecord, tail: JobTail) -> JobRecord:
        """Take the worker's pid from its ``started`` event when the store has none.

        The spawning server stores the pid right after the spawn; killed in between, it leaves a
        job whose worker runs unknown to the store. The worker names itself in ``started``; its
        pid is adopted only if that process began between the job's creation and that event
        (a pid reused by an unrelated process started at another time is not).
        """
        if record.pid is not None or tail.started is None:
            return record
        pid, said_at = tail.started.pid, tail.started.time
        start = procs.process_start_time(pid)
        tolerance = procs.START_TIME_TOLERANCE_S
        if start is None or not (record.created_at - tolerance <= start <= said_at + tolerance):
            return record
        if self.store.adopt_process(record.id, pid, start):
            log.info("job %s: following its worker (pid %d) named by its started event", record.id, pid)
        return self.store.get(record.id) or record

    def _reopen_if_resumed(self, record: JobRecord, tail: JobTail) -> JobRecord:
        """A failed or cancelled job resumed outside this server (``backprop resume`` clears its
        result and runs a new worker): follow it again instead of showing the old ending.

        Only when its folder says so: no readable ``result.json``, a ``started`` event after the last
        ``finished`` one and after the store recorded the end, and the process it names alive and
        begun before that event (so a pid reused by an unrelated process is not taken for the worker).
        """
        started = tail.started
        if record.state == "succeeded" or started is None or tail.finished is not None:
            return record
        # The attempt that ended started before the store marked the end (a worker killed by force
        # may still be exiting, and it wrote no ``finished``): only a later ``started`` is a resume.
        if record.finished_at is None or started.time <= record.finished_at:
            return record
        if self._result(record) is not None:
            return record
        start = procs.process_start_time(started.pid)
        tolerance = procs.START_TIME_TOLERANCE_S
        if start is None or not (record.created_at - tolerance <= start <= started.time + tolerance):
            return record
        if not procs.is_alive(procs.ProcessIdentity(started.pid, start)):
            return record
        if self.store.reopen(record.id, record.state, started.pid, start):
            log.info(
                "job %s: resumed outside the server (worker pid %d); following it again",
                record.id,
                started.pid,
            )
        return self.store.get(record.id) or record

    def _derive_state(
        self, record: JobRecord, tail: JobTail, exit_code: int | None
    ) -> tuple[JobState, str | None]:
        worker_alive = (
            exit_code is None
            and record.pid is not None
            and procs.is_alive(procs.ProcessIdentity(record.pid, record.pid_start_time or 0.0))
        )
        result = self._result(record)
        if result is not None and tail.finished is None and worker_alive:
            # The worker writes result.json, then its ``finished`` event. The job ends once both are
            # there, so whoever sees the end also sees how it ended (the dashboard stops polling then
            # and shows the resume command the event carries).
            with self._lock:
                tail.poll()
            if tail.finished is None:
                return ("running" if tail.started is not None else "queued"), None
        if result is not None:
            return result.status, _result_error(result)
        if tail.finished is not None:
            status: JobState = tail.finished.status
            return status, tail.error_message() if status == "failed" else None
        if worker_alive:
            return ("running" if tail.started is not None else "queued"), None
        if record.pid is None and time.time() - record.created_at < _SPAWN_GRACE_S:
            return record.state, None
        # The worker is gone. It may have written its result just before exiting: look once more.
        with self._lock:
            tail.poll()
        result = self._result(record)
        if result is not None:
            return result.status, _result_error(result)
        if record.cancel_requested_at is not None:
            with self._lock:
                return "cancelled", self._stop_reasons.get(record.id)
        return "failed", self.death_reason(record, tail, exit_code)

    @staticmethod
    def _result(record: JobRecord) -> JobResult | None:
        try:
            return read_result(record.job_dir)
        except (ValueError, OSError) as exc:
            log.warning("job %s: unreadable result.json (%s)", record.id, exc)
            return None

    def death_reason(self, record: JobRecord, tail: JobTail, exit_code: int | None) -> str:
        """Why a worker that vanished without a result failed, in words an agent can act on."""
        how = f"the worker process (pid {record.pid}) ended without finishing the job"
        if exit_code is not None:
            how += (
                f" (exit code {exit_code}"
                + (f", killed by signal {-exit_code}" if exit_code < 0 else "")
                + ")"
            )
        if tail.error is not None:
            return f"{tail.error_message()} — {how}"
        stderr_tail = _last_lines(record.job_dir / WORKER_LOG, 3)
        if stderr_tail:
            return f"{how}; its last stderr lines: {stderr_tail}"
        last = tail.warnings[-1] if tail.warnings else tail.last_log
        if last:
            return f"{how}; its last event said: {last}"
        return f"{how} and left no error message (killed from outside, e.g. out of host memory or SIGKILL)"

    # -- cancelling -----------------------------------------------------------------------------

    def request_cancel(self, record: JobRecord) -> None:
        """Ask the worker to checkpoint and stop (a file, so no signals are needed)."""
        request_cancel(record.job_dir)
        self.store.mark_cancel_requested(record.id)

    def force_stop(self, record: JobRecord, why: str) -> None:
        with self._lock:
            self._stop_reasons[record.id] = why
        try:
            if record.pid is not None:
                procs.kill_tree(procs.ProcessIdentity(record.pid, record.pid_start_time or 0.0))
            self._reap(record.id)
            latest = self.store.get(record.id) or record
            # A result written in the meantime wins: the job really finished.
            result = self._result(latest)
            if result is not None:
                self.store.transition(
                    record.id, result.status, error=_result_error(result), finished_at=time.time()
                )
            else:
                self.store.transition(record.id, "cancelled", error=why, finished_at=time.time())
        finally:
            with self._lock:
                self._stop_reasons.pop(record.id, None)

    def enforce_cancel_deadlines(self) -> list[str]:
        """Kill workers that ignored a cancel request for longer than the grace period."""
        killed = []
        now = time.time()
        for record in self.store.list(states={"queued", "running"}):
            if (
                record.cancel_requested_at is not None
                and now - record.cancel_requested_at > self.cancel_grace_s
            ):
                self.force_stop(
                    record, f"cancelled by force: the worker did not stop within {self.cancel_grace_s:.0f} s"
                )
                killed.append(record.id)
        return killed


def _result_error(result: JobResult) -> str | None:
    return describe_error(result.error) if result.error is not None else None


def _last_lines(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-600:]


def read_job_result(record: JobRecord) -> dict[str, Any] | None:
    result = Supervisor._result(record)
    return result.model_dump() if result is not None else None
