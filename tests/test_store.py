"""The SQLite job store: WAL mode, final states stay final, several processes agree."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backprop_mcp.store import JobStore

REPO = Path(__file__).resolve().parents[1]


def test_store_uses_wal_and_round_trips(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rec = store.create("ft-20261128-000000-aaaaaa", "finetune", tmp_path / "j1", "tiny on a.jsonl")
    assert rec.state == "queued" and rec.pid is None and not rec.is_terminal
    store.set_process(rec.id, 1234, 99.5)
    got = store.get(rec.id)
    assert got is not None and got.pid == 1234 and got.pid_start_time == 99.5
    assert got.job_dir == tmp_path / "j1" and got.label == "tiny on a.jsonl"
    assert store.get("ft-20261128-000000-ffffff") is None


def test_final_states_are_final(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    rec = store.create("ft-20261128-000000-aaaaaa", "finetune", tmp_path, "")
    assert store.transition(rec.id, "running", started_at=10.0)
    assert not store.transition(rec.id, "running")  # nothing changed
    assert store.transition(rec.id, "failed", error="boom", finished_at=20.0)
    # A second server that still thinks the job runs cannot bring it back.
    assert not store.transition(rec.id, "running")
    assert not store.transition(rec.id, "succeeded")
    final = store.get(rec.id)
    assert final is not None
    assert (final.state, final.error, final.started_at, final.finished_at) == ("failed", "boom", 10.0, 20.0)


def test_list_orders_newest_first_and_filters(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = [f"ft-20261128-00000{i}-aaaaaa" for i in range(3)]
    for job_id in ids:
        store.create(job_id, "finetune", tmp_path / job_id, "")
    store.transition(ids[0], "succeeded")
    assert [r.id for r in store.list()] == list(reversed(ids))
    assert [r.id for r in store.list(states={"queued"})] == [ids[2], ids[1]]
    store.mark_cancel_requested(ids[1])
    first = store.get(ids[1])
    store.mark_cancel_requested(ids[1])  # keeps the first request's time
    again = store.get(ids[1])
    assert first is not None and again is not None
    assert first.cancel_requested_at == again.cancel_requested_at is not None


def test_duplicate_id_is_refused(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.create("ft-20261128-000000-aaaaaa", "finetune", tmp_path, "")
    with pytest.raises(sqlite3.IntegrityError):
        store.create("ft-20261128-000000-aaaaaa", "finetune", tmp_path, "")


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    """Two server processes sharing one state folder: every write lands, the database stays sound."""
    db = tmp_path / "jobs.sqlite3"
    JobStore(db)
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from backprop_mcp.store import JobStore
        store = JobStore(Path({str(db)!r}))
        tag = sys.argv[1]
        for i in range(40):
            job_id = f"ft-20261128-{{i:06d}}-{{tag}}"
            store.create(job_id, "finetune", Path("/tmp") / job_id, tag)
            store.transition(job_id, "running")
            store.transition(job_id, "succeeded")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", script, tag], env=env) for tag in ("aaaaaa", "bbbbbb")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = JobStore(db)
    records = store.list()
    assert len(records) == 80 and all(r.state == "succeeded" for r in records)
    assert store.integrity_ok()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(RuntimeError, match="newer backprop-mcp"):
        JobStore(db)
