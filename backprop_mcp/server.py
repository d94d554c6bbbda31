"""The MCP server: tools, resources and change notifications over the job machinery.

Long work never runs inside a tool call. ``start_finetune`` (and ``run_slao_series``,
``export_gguf``) validate, create a job folder, start a detached worker and return its id at
once; ``job_status`` can wait a bounded time for it, sending progress notifications while it
waits; a background watcher (owned by the server's lifespan, never by a request) tails every
unfinished job and tells subscribers which resources changed, on both protocol versions:
2026-07-28 ``subscriptions/listen`` through the subscription bus, 2025-11-25
``resources/subscribe`` through the sessions that subscribed.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

from backprop_mcp import __version__, checks
from backprop_mcp.app import dashboard_extension, hide_from_plain_hosts
from backprop_mcp.follow_tools import register_follow_tools
from backprop_mcp.inspect_tools import register_inspect_tools
from backprop_mcp.job_tools import register_job_tools
from backprop_mcp.job_views import ServerState, job_uri
from backprop_mcp.paths import check_job_id
from backprop_mcp.policy import listen_for_roots_changes
from backprop_mcp.resources import LegacySubscriptions, register_resources
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_errors import compact_argument_errors, guard_tools
from backprop_mcp.tool_outputs import StartedJob

log = logging.getLogger("backprop_mcp")

INSTRUCTIONS = """\
Fine-tune open LLMs (LoRA/QLoRA) on this machine's GPU (or CPU for small models).
Typical flow: inspect_gpu -> check_dataset(path) -> start_finetune(dataset_path, model) -> \
job_status(job_id, wait_s=30) repeatedly until it ends -> try_model(job_id, prompt) -> export_gguf(job_id).
Jobs run in the background and survive restarts of this server; never wait in a loop without \
job_status's wait_s. Paths must be absolute. Resources: backprop://jobs, backprop://jobs/{job_id}, \
backprop://jobs/{job_id}/events, backprop://jobs/{job_id}/loss.png, backprop://gpu."""


class _LazyState:
    """Builds the server state on first use, so ``BACKPROP_HOME`` is read when the server runs."""

    def __init__(self, home: Path | None, worker_command: list[str] | None):
        self._home, self._worker_command = home, worker_command
        self._state: ServerState | None = None
        self._lock = threading.Lock()

    def get(self) -> ServerState:
        with self._lock:
            if self._state is None:
                self._state = ServerState(self._home, worker_command=self._worker_command)
            return self._state


def build_server(home: Path | None = None, *, worker_command: list[str] | None = None) -> MCPServer:
    """The server, with its state folder (default: ``BACKPROP_HOME`` read at start)."""
    lazy = _LazyState(home, worker_command)
    legacy = LegacySubscriptions()
    bus = InMemorySubscriptionBus()
    poll_s = float(os.environ.get("BACKPROP_POLL_S", "0.5"))

    def find_job(job_id: str) -> JobRecord:
        job_id = check_job_id(job_id)
        state = lazy.get()
        record = state.get_record(job_id)
        if record is None:
            raise ToolError(f"no job {job_id!r} in {state.home}. Call list_jobs to see the existing job ids.")
        return record

    server = MCPServer(
        "backprop-mcp",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=_lifespan(lazy, bus, legacy, poll_s),
        subscriptions=bus,
        extensions=[dashboard_extension(lazy.get, find_job)],  # the job dashboard app (backprop_mcp/app.py)
        middleware=[hide_from_plain_hosts, compact_argument_errors],
    )

    def start(spec: checks.JobSpec, label: str) -> StartedJob:
        """The preflight, then the job: its folder and a detached worker."""
        notes = checks.preflight(spec)
        try:
            record = lazy.get().supervisor.start_job(spec, label=label)
        except (OSError, ValueError) as exc:
            raise ToolError(
                f"could not start the worker process: {exc}. Check that the engine is installed."
            ) from exc
        return StartedJob(
            job_id=record.id,
            kind=record.kind,
            state=record.state,
            resource_uri=job_uri(record.id),
            job_dir=str(record.job_dir),
            spec=spec.model_dump(mode="json"),
            notes=notes,
            next_step=f"Call job_status(job_id='{record.id}', wait_s=30) to follow it.",
        )

    register_job_tools(server, find_job, start)  # start_finetune, run_slao_series, export_gguf
    register_follow_tools(server, lazy.get, find_job, poll_s)  # job_status, list_jobs, cancel_job
    register_inspect_tools(server, lazy.get, find_job)  # inspect_gpu, check_dataset, try_model
    register_resources(server, lazy.get, find_job, legacy)
    for tool in server._tool_manager.list_tools():  # Python < 3.13 keeps the docstrings' indentation
        tool.description = inspect.cleandoc(tool.description)
    listen_for_roots_changes(server)
    guard_tools(server)  # last: wraps every tool registered above
    return server


def _lifespan(
    lazy: _LazyState, bus: InMemorySubscriptionBus, legacy: LegacySubscriptions, poll_s: float
) -> Callable[[MCPServer], AbstractAsyncContextManager[ServerState]]:
    """The server's lifespan: a watcher that tails every unfinished job and tells subscribers, on both
    protocol versions, which resources changed."""

    async def watch(state: ServerState) -> None:
        while True:
            try:
                changed = await anyio.to_thread.run_sync(state.poll_changes)
                for uri in dict.fromkeys(changed):
                    await bus.publish(ResourceUpdated(uri=uri))
                    await legacy.notify(uri)
            except Exception:  # the watcher must outlive any one bad job folder
                log.exception("job watcher: poll failed")
            await anyio.sleep(poll_s)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[ServerState]:
        # Reattaching to unfinished jobs is the watcher's first poll: it runs in the background, so
        # the client's first requests are answered without waiting for it.
        state = await anyio.to_thread.run_sync(lazy.get)
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, state)
            try:
                yield state
            finally:
                tg.cancel_scope.cancel()

    return lifespan


server = build_server()
