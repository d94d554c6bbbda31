"""The tools that follow and stop jobs: ``job_status`` (which can wait, sending progress
notifications), ``list_jobs`` and ``cancel_job``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from backprop_mcp.app import LINKED_TOOL_META
from backprop_mcp.job_views import ServerState, progress_of
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_outputs import CancelResult, JobList, JobStatus
from backprop_mcp.tooling import hints, name_arg

MAX_WAIT_S = 45.0  # some clients drop a tool call at ~60 s whatever progress arrives
DEFAULT_WAIT_S = 20.0
RUNNING_CAP = 99.9  # percent: what a running job reports at most (see job_status)
READ_ONLY = hints(read_only=True, destructive=False, idempotent=True, open_world=False)


def register_follow_tools(
    server: MCPServer,
    get_state: Callable[[], ServerState],
    find_job: Callable[[str], JobRecord],
    poll_s: float,
) -> None:
    _job_status(server, get_state, find_job, poll_s)

    @server.tool(name="list_jobs", title="List jobs", annotations=READ_ONLY)
    def list_jobs(
        state: Annotated[
            Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
            Field(description="only jobs in this state"),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=500)] = 50,
    ) -> JobList:
        """Jobs in this state folder, newest first, with their state and progress."""
        return get_state().job_list(state=state, limit=limit)

    _cancel_job(server, get_state, find_job)


def _job_status(
    server: MCPServer,
    get_state: Callable[[], ServerState],
    find_job: Callable[[str], JobRecord],
    poll_s: float,
) -> None:
    @server.tool(name="job_status", title="Job status (can wait for progress)", annotations=READ_ONLY,
                 meta=LINKED_TOOL_META)  # fmt: skip
    async def job_status(
        job_id: Annotated[str, name_arg("the id start_finetune (or list_jobs) gave")],
        ctx: Context,
        wait_s: Annotated[
            float,
            Field(
                ge=0,
                description=f"wait up to this many seconds for the job to end, sending progress notifications "
                f"meanwhile (capped at {MAX_WAIT_S:.0f}; 0 answers at once)",
            ),
        ] = DEFAULT_WAIT_S,
    ) -> JobStatus:
        """A job's state (queued, running, succeeded, failed, cancelled), progress, latest metrics,
        artifacts and error. With wait_s it waits until the job ends or wait_s passes, reporting progress
        as steps go by; call it again to keep following a long job."""
        record = await anyio.to_thread.run_sync(find_job, job_id)
        state = get_state()
        wait = min(float(wait_s), MAX_WAIT_S)
        deadline = anyio.current_time() + wait
        last_sent = -1.0
        while not record.is_terminal and anyio.current_time() < deadline:
            value, message = _progress_point(state, record)
            # A job past its last step is still saving: 100 is kept for its end, because the
            # protocol wants every notification's value above the one before.
            value = min(value, RUNNING_CAP)
            if value > last_sent:
                # Cancelling this wait (the client gave up) never touches the job itself.
                await ctx.report_progress(value, 100.0, message)
                last_sent = value
            await anyio.sleep(min(poll_s, max(0.0, deadline - anyio.current_time())))
            record = await anyio.to_thread.run_sync(find_job, record.id)
        if record.is_terminal and last_sent >= 0:  # it ended while we waited: say where it got to
            value, message = _progress_point(state, record)
            if not message.startswith(record.state):
                message = f"{record.state}: {message}"
            if value > last_sent:
                await ctx.report_progress(value, 100.0, message)
        return await anyio.to_thread.run_sync(state.status, record)


def _cancel_job(
    server: MCPServer, get_state: Callable[[], ServerState], find_job: Callable[[str], JobRecord]
) -> None:
    @server.tool(
        name="cancel_job",
        title="Cancel a job",
        annotations=hints(read_only=False, destructive=True, idempotent=True, open_world=False),
    )
    def cancel_job(
        job_id: Annotated[str, name_arg()],
        force: Annotated[
            bool, Field(description="kill the worker now instead of letting it checkpoint and stop")
        ] = False,
    ) -> CancelResult:
        """Stop a queued or running job. By default the worker saves a checkpoint and stops at its next
        step (it is killed if it has not stopped within the grace period); force=true kills it now."""
        record = find_job(job_id)
        supervisor = get_state().supervisor
        if record.is_terminal:
            return CancelResult(
                job_id=record.id, state=record.state, message=f"the job had already ended ({record.state})."
            )
        supervisor.request_cancel(record)
        if force:
            supervisor.force_stop(record, "cancelled by force (cancel_job with force=true)")
            record = find_job(record.id)
            return CancelResult(job_id=record.id, state=record.state, message="the worker was killed.")
        grace = supervisor.cancel_grace_s
        return CancelResult(
            job_id=record.id,
            state=find_job(record.id).state,
            message=f"cancel requested: the worker checkpoints and stops at its next step (killed after {grace:.0f} s "
            "if it does not). job_status shows 'cancelled' once it has stopped.",
        )


def _progress_point(state: ServerState, record: JobRecord) -> tuple[float, str]:
    """(percent done, message) for a progress notification."""
    tail = state.supervisor.tail(record)
    progress = progress_of(tail)
    if record.state == "queued" or progress is None:
        if record.state == "queued":
            reason = tail.queued.message if tail.queued else None
        else:
            reason = tail.stage.name if tail.stage else None
        return 0.0, f"{record.state}: {reason or 'starting'}"
    pct = 100.0 * (progress.fraction or 0.0)
    parts = [f"step {progress.step}/{progress.total}"]
    if progress.run and progress.num_runs:
        parts.insert(0, f"run {progress.run}/{progress.num_runs}")
    if progress.loss is not None:
        parts.append(f"loss {progress.loss:.4g}")
    if progress.eta_s is not None:
        parts.append(f"eta {progress.eta_s:.0f} s")
    return round(pct, 2), ", ".join(parts)
