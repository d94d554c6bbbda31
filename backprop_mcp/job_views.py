"""The server's state: the store, the supervisor, and the views of a job that tools and resources share."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backprop_mcp.job_events import JobTail
from backprop_mcp.store import JobRecord, JobStore
from backprop_mcp.supervisor import Supervisor, read_job_result
from backprop_mcp.tool_outputs import JobList, JobStatus, JobSummary, Progress
from engine.interface import backprop_home, running_artifacts

log = logging.getLogger(__name__)

JOBS_URI = "backprop://jobs"
GPU_URI = "backprop://gpu"


def job_uri(job_id: str) -> str:
    return f"{JOBS_URI}/{job_id}"


def job_uris(job_id: str) -> list[str]:
    base = job_uri(job_id)
    return [base, f"{base}/events", f"{base}/loss.png"]


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None


def progress_of(tail: JobTail) -> Progress | None:
    """The latest progress, with the fraction of the whole job done (a series: over all its runs)."""
    p = tail.progress
    if p is None:
        return None
    fraction = p.step / p.total if p.total > 0 else None
    if fraction is not None and p.run and p.runs:
        fraction = ((p.run - 1) + fraction) / p.runs
    return Progress(
        step=p.step,
        total=p.total,
        fraction=round(fraction, 4) if fraction is not None else None,
        run=p.run,
        num_runs=p.runs,
        loss=p.loss,
        learning_rate=p.lr,
        tokens_per_s=p.tokens_per_s,
        eta_s=p.eta_s,
        metrics=p.metrics,
    )


def percent_done(record: JobRecord, progress: Progress | None) -> float | None:
    """0..100 over the whole job (a series: over all its runs); None before its first step."""
    if record.state == "succeeded":
        return 100.0
    return round(100 * progress.fraction, 1) if progress and progress.fraction is not None else None


def _next_step(record: JobRecord) -> str:
    if record.state in ("queued", "running"):
        return (
            f"Call job_status with job_id='{record.id}' and wait_s=30 to follow it, or cancel_job to stop it."
        )
    if record.state == "succeeded":
        if record.kind == "finetune":
            return f"Try it with try_model(job_id='{record.id}', prompt=...), or export it with export_gguf."
        return "Done: the artifacts listed are ready to use."
    if record.state == "failed":
        return "Read the error, fix the settings or data it names, and start a new job."
    return "The job was cancelled; its last checkpoint (if any) is listed in artifacts."


class ServerState:
    def __init__(self, home: Path | None = None, *, worker_command: list[str] | None = None):
        self.home = (home or backprop_home()).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.home / "jobs.sqlite3")
        self.supervisor = Supervisor(self.home, self.store, worker_command=worker_command)
        self._list_signature: tuple[tuple[str, str], ...] = ()
        self._reattached = False

    # -- views -----------------------------------------------------------------------------------

    def get_record(self, job_id: str) -> JobRecord | None:
        record = self.store.get(job_id)
        if record is None:
            return None
        return self.supervisor.refresh(record).record

    def status(self, record: JobRecord) -> JobStatus:
        tail = self.supervisor.tail(record)
        result = read_job_result(record) if record.is_terminal else None
        end = record.finished_at or time.time()
        begin = record.started_at
        queued_reason = None
        if record.state == "queued":
            queued_reason = tail.queued.message if tail.queued else "the worker is starting"
        metrics: dict[str, Any] = dict((result or {}).get("metrics") or {})
        if not metrics and tail.progress:
            metrics = tail.progress.model_dump(
                include={"loss", "grad_norm", "tokens_per_s", "lr"}, exclude_none=True
            )
        if tail.runs_finished:
            metrics.setdefault("runs_finished", len(tail.runs_finished))
        # what the job has written so far (GRPO's completions), while it runs too; then the result's
        artifacts = {**running_artifacts(record.job_dir), **((result or {}).get("artifacts") or {})}
        if tail.checkpoint and record.state != "succeeded":
            artifacts.setdefault("last_checkpoint", tail.checkpoint.path)
        return JobStatus(
            job_id=record.id,
            kind=record.kind,
            state=record.state,
            label=record.label,
            resource_uri=job_uri(record.id),
            job_dir=str(record.job_dir),
            created_at=_iso(record.created_at) or "",
            started_at=_iso(record.started_at),
            finished_at=_iso(record.finished_at),
            elapsed_s=round(end - begin, 1) if begin else None,
            stage=tail.stage.name if tail.stage and not record.is_terminal else None,
            progress=progress_of(tail),
            queued_reason=queued_reason,
            metrics=metrics,
            artifacts=artifacts,
            warnings=list(tail.warnings)[-5:],
            error=record.error if record.state in ("failed", "cancelled") else None,
            cancel_requested=record.cancel_requested_at is not None,
            next_step=_next_step(record),
        )

    def summary(self, record: JobRecord) -> JobSummary:
        return JobSummary(
            job_id=record.id,
            kind=record.kind,
            state=record.state,
            label=record.label,
            created_at=_iso(record.created_at) or "",
            percent=percent_done(record, progress_of(self.supervisor.tail(record))),
            resource_uri=job_uri(record.id),
        )

    def job_list(self, *, state: str | None = None, limit: int = 50) -> JobList:
        records = [self.supervisor.refresh(r).record for r in self.store.list(limit=max(limit, 1) * 4)]
        if state:
            records = [r for r in records if r.state == state]
        records = records[:limit]
        return JobList(
            jobs=[self.summary(r) for r in records], count=len(records), state_folder=str(self.home)
        )

    def recent_events(self, record: JobRecord, limit: int = 100) -> list[dict[str, Any]]:
        tail = self.supervisor.tail(record)
        return [e.model_dump() for e in list(tail.recent)[-limit:]]

    # -- the watcher's poll ----------------------------------------------------------------------

    def poll_changes(self) -> list[str]:
        """Refresh every unfinished job; return the resource URIs whose content changed."""
        changed: list[str] = []
        self.supervisor.enforce_cancel_deadlines()
        self.supervisor.keep_worker_warm()
        unfinished = self.store.list(states={"queued", "running"})
        if not self._reattached:
            self._reattached = True
            if unfinished:
                log.info("following %d unfinished job(s) found in %s", len(unfinished), self.home)
        for record in unfinished:
            refresh = self.supervisor.refresh(record)
            if refresh.new_events or refresh.state_changed:
                changed.extend(job_uris(record.id))
        signature = tuple((r.id, r.state) for r in self.store.list(limit=1000))
        if signature != self._list_signature:
            if self._list_signature or signature:
                changed.append(JOBS_URI)
            self._list_signature = signature
        return changed
