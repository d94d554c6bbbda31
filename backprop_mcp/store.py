"""The job index: one SQLite database (WAL mode) in the state folder.

The job folder is the source of truth for what a job did (spec, events, result); this store
indexes jobs (id, kind, state, worker pid and start time, folder, timestamps) so that listing
is cheap and several server processes sharing one state folder agree. Every write is one short
transaction; a state change is a compare-and-set that never moves a job out of a final state,
so two servers refreshing the same job cannot undo each other. The one exception is ``reopen``: a
failed or cancelled job whose own folder shows a live worker started after it ended (``backprop
resume``) becomes ``running`` again.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.interface import JobState

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
_SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    pid_start_time REAL,
    cancel_requested_at REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
"""


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    state: JobState
    job_dir: Path
    label: str
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    pid: int | None
    pid_start_time: float | None
    cancel_requested_at: float | None
    error: str | None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def trained(self) -> bool:
        """A succeeded fine-tune or series: it has an adapter to try or export."""
        return self.state == "succeeded" and self.kind in ("finetune", "slao_series")


def _record(row: sqlite3.Row) -> JobRecord:
    data: dict[str, Any] = dict(row)
    data["job_dir"] = Path(data["job_dir"])
    return JobRecord(**data)


class JobStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and vice versa
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise RuntimeError(
                    f"the job store {path} was written by a newer backprop-mcp (schema {version}); "
                    "upgrade backprop-mcp or point BACKPROP_HOME at another folder"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One connection per operation: tool handlers run in worker threads, and a short-lived
        # connection is the simplest way to be thread-safe and multi-process-safe at once.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def create(self, job_id: str, kind: str, job_dir: Path, label: str) -> JobRecord:
        now = time.time()
        with self._connect() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, state, job_dir, label, created_at, updated_at) "
                "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                (job_id, kind, str(job_dir), label, now, now),
            )
        record = self.get(job_id)
        assert record is not None
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, *, states: set[str] | None = None, limit: int = 1000) -> list[JobRecord]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,)
            ).fetchall()
        records = [_record(r) for r in rows]
        return [r for r in records if states is None or r.state in states]

    def set_process(self, job_id: str, pid: int, start_time: float) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET pid = ?, pid_start_time = ?, updated_at = ? WHERE id = ?",
                (pid, start_time, time.time(), job_id),
            )

    def adopt_process(self, job_id: str, pid: int, start_time: float) -> bool:
        """Record a worker found by its own ``started`` event, only while the job has no pid yet.

        Returns whether the row was updated: a pid already stored (by the spawning server, or by
        another server adopting first) is never overwritten.
        """
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET pid = ?, pid_start_time = ?, updated_at = ? WHERE id = ? AND pid IS NULL",
                (pid, start_time, time.time(), job_id),
            )
            return cur.rowcount > 0

    def mark_cancel_requested(self, job_id: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE jobs SET cancel_requested_at = COALESCE(cancel_requested_at, ?), updated_at = ? WHERE id = ?",
                (time.time(), time.time(), job_id),
            )

    def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> bool:
        """Move a job to ``state`` unless it is already final. Returns whether anything changed."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT state, error, started_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["state"] in TERMINAL_STATES:
                db.execute("ROLLBACK")
                return False
            changed = row["state"] != state or (error is not None and row["error"] != error)
            changed = changed or (started_at is not None and row["started_at"] is None)
            if changed:
                db.execute(
                    "UPDATE jobs SET state = ?, error = COALESCE(?, error), started_at = COALESCE(started_at, ?), "
                    "finished_at = COALESCE(?, finished_at), updated_at = ? WHERE id = ?",
                    (state, error, started_at, finished_at, time.time(), job_id),
                )
            db.execute("COMMIT")
            return bool(changed)

    def reopen(self, job_id: str, ended_as: str, pid: int, start_time: float) -> bool:
        """Back to ``running`` with a new worker, only from the final state ``ended_as`` (failed or
        cancelled) that the caller saw: a compare-and-set, so two servers reopen it once."""
        if ended_as not in ("failed", "cancelled"):
            raise ValueError(f"only a failed or cancelled job can be resumed, not a {ended_as} one")
        with self._connect() as db:
            cur = db.execute(
                "UPDATE jobs SET state = 'running', error = NULL, finished_at = NULL, cancel_requested_at = NULL, "
                "pid = ?, pid_start_time = ?, updated_at = ? WHERE id = ? AND state = ?",
                (pid, start_time, time.time(), job_id, ended_as),
            )
            return cur.rowcount > 0

    def integrity_ok(self) -> bool:
        with self._connect() as db:
            return bool(db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")
