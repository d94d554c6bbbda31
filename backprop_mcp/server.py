"""The MCP server: tools, resources and change notifications over the job machinery.

Long work never runs inside a tool call. ``start_finetune`` (and ``run_slao_series``,
``export_gguf``) validate, create a job folder, start a detached worker and return its id at
once; ``job_status`` can wait a bounded time for it, sending progress notifications while it
waits; a background watcher (owned by the server's lifespan, never by a request) tails every
unfinished job and tells subscribers which resources changed, on both protocol versions:
2026-07-28 ``subscriptions/listen`` through the subscription bus, 2025-11-25
``resources/subscribe`` through the sessions that subscribed.

This module imports no torch/transformers: whatever needs them runs in an engine subprocess.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from pydantic import Field

from backprop_mcp import __version__, checks
from backprop_mcp.app import LINKED_TOOL_META, dashboard_extension, hide_from_plain_hosts
from backprop_mcp.engine_calls import EngineCallError, call_engine
from backprop_mcp.guard import guard_tools
from backprop_mcp.job_tools import register_job_tools
from backprop_mcp.limits import (
    MAX_PROMPT_CHARS,
    MAX_SYSTEM_CHARS,
)
from backprop_mcp.models import (
    CancelResult,
    DatasetCheck,
    Generation,
    JobList,
    JobStatus,
    StartedJob,
)
from backprop_mcp.paths import check_job_id
from backprop_mcp.policy import ClientRoots, listen_for_roots_changes
from backprop_mcp.resources import LegacySubscriptions, register_resources
from backprop_mcp.state import ServerState, job_uri, progress_of
from backprop_mcp.store import JobRecord
from backprop_mcp.tooling import CHECK_DATASET_TAKES, hints, name_arg, path_arg, takes_settings
from engine.interface import (
    FinetuneSpec,
    GpuReport,
    gpu_report,
    quoted,
    read_spec,
    require_extra,
)

log = logging.getLogger("backprop_mcp")

MAX_WAIT_S = 45.0  # some clients drop a tool call at ~60 s whatever progress arrives
DEFAULT_WAIT_S = 20.0
CHECK_DATA_TIMEOUT_S = 55.0  # under the ~60 s after which clients drop a call
TRY_MODEL_LOAD_ALLOWANCE_S = 30.0
TRY_MODEL_CEILING_S = 55.0

INSTRUCTIONS = """\
Fine-tune open LLMs (LoRA/QLoRA) on this machine's GPU (or CPU for small models).
Typical flow: inspect_gpu -> check_dataset(path) -> start_finetune(dataset_path, model) -> \
job_status(job_id, wait_s=30) repeatedly until it ends -> try_model(job_id, prompt) -> export_gguf(job_id).
Jobs run in the background and survive restarts of this server; never wait in a loop without \
job_status's wait_s. Paths must be absolute. Resources: backprop://jobs, backprop://jobs/{job_id}, \
backprop://jobs/{job_id}/events, backprop://jobs/{job_id}/loss.png, backprop://gpu."""

_T = TypeVar("_T")


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
    bus = InMemorySubscriptionBus()
    legacy = LegacySubscriptions()
    poll_s = float(os.environ.get("BACKPROP_POLL_S", "0.5"))

    async def publish(uris: list[str]) -> None:
        for uri in dict.fromkeys(uris):
            await bus.publish(ResourceUpdated(uri=uri))
            await legacy.notify(uri)

    async def watch(state: ServerState) -> None:
        while True:
            try:
                changed = await anyio.to_thread.run_sync(state.poll_changes)
                if changed:
                    await publish(changed)
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
        lifespan=lifespan,
        subscriptions=bus,
        extensions=[dashboard_extension(lazy.get, find_job)],  # the job dashboard app (backprop_mcp/app.py)
        middleware=[hide_from_plain_hosts],
    )

    async def in_thread(fn: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    def create(spec: checks.JobSpec, label: str) -> StartedJob:
        """The preflight, then the job: its folder and a detached worker."""
        notes = checks.preflight(spec)
        state = lazy.get()
        try:
            record = state.supervisor.create_job(spec, label=label)
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

    # -- tools --------------------------------------------------------------------------------

    register_job_tools(server, find_job, create)  # start_finetune, run_slao_series, export_gguf

    @server.tool(
        name="inspect_gpu",
        title="Inspect GPUs",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    def inspect_gpu() -> GpuReport:
        """Describe this machine's GPUs (memory total/free/used, utilisation, temperature, power,
        compute capability, bf16 support, driver and CUDA versions) and which model presets fit.
        On a machine without an NVIDIA GPU it says so and what still works (CPU training of small models)."""
        return gpu_report()

    @server.tool(
        name="job_status",
        title="Job status (can wait for progress)",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=False),
        meta=LINKED_TOOL_META,
    )
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
        record = await in_thread(find_job, job_id)
        state = lazy.get()
        wait = min(float(wait_s), MAX_WAIT_S)
        deadline = anyio.current_time() + wait
        last_sent = -1.0
        while not record.is_terminal and anyio.current_time() < deadline:
            value, message = _progress_point(state, record)
            if value > last_sent:
                # Cancelling this wait (the client gave up) never touches the job itself.
                await ctx.report_progress(value, 100.0, message)
                last_sent = value
            await anyio.sleep(min(poll_s, max(0.0, deadline - anyio.current_time())))
            record = await in_thread(find_job, record.id)
        if record.is_terminal and last_sent >= 0:  # it ended while we waited: say where it got to
            value, message = _progress_point(state, record)
            if not message.startswith(record.state):
                message = f"{record.state}: {message}"
            await ctx.report_progress(max(value, last_sent), 100.0, message)
        return await in_thread(state.status, record)

    @server.tool(
        name="list_jobs",
        title="List jobs",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    def list_jobs(
        state: Annotated[
            Literal["queued", "running", "succeeded", "failed", "cancelled"] | None,
            Field(description="only jobs in this state"),
        ] = None,
        limit: Annotated[int, Field(ge=1, le=500)] = 50,
    ) -> JobList:
        """Jobs in this state folder, newest first, with their state and progress."""
        return lazy.get().job_list(state=state, limit=limit)

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
        state = lazy.get()
        if record.is_terminal:
            return CancelResult(
                job_id=record.id, state=record.state, message=f"the job had already ended ({record.state})."
            )
        state.supervisor.request_cancel(record)
        if force:
            state.supervisor.force_stop(record, "cancelled by force (cancel_job with force=true)")
            record = find_job(record.id)
            return CancelResult(job_id=record.id, state=record.state, message="the worker was killed.")
        grace = state.supervisor.cancel_grace_s
        return CancelResult(
            job_id=record.id,
            state=find_job(record.id).state,
            message=f"cancel requested: the worker checkpoints and stops at its next step (killed after {grace:.0f} s "
            "if it does not). job_status shows 'cancelled' once it has stopped.",
        )

    @server.tool(
        name="check_dataset",
        title="Check a dataset",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=True),
    )
    @takes_settings(
        FinetuneSpec,
        only=CHECK_DATASET_TAKES,
        model=path_arg("the model whose tokenizer and chat template to measure with"),
    )
    def check_dataset(
        path: Annotated[
            str,
            path_arg("absolute path of the dataset file or folder (or a hub dataset name)"),
        ],
        *,
        roots: ClientRoots,
        **settings: Any,
    ) -> DatasetCheck:
        """Check a dataset before training: format detected, row count, bad rows with line numbers,
        token-length statistics with the model's tokenizer and chat template, whether it fits, and the
        defaults (sequence length, batch, steps, memory) a fine-tune would use."""
        require_extra("train", "check_dataset")
        data_path = checks.dataset_path(path)
        args = {**settings, "path": data_path, "model": checks.permitted_model(settings["model"])}
        try:
            out = call_engine("check-data", args, timeout_s=CHECK_DATA_TIMEOUT_S, home=lazy.get().home)
        except EngineCallError as exc:
            raise ToolError(f"checking {quoted(data_path)} failed: {exc}") from exc
        return checks.dataset_check_result(data_path, out)

    @server.tool(
        name="try_model",
        title="Try a model on a prompt",
        annotations=hints(read_only=True, destructive=False, idempotent=True, open_world=True),
    )
    def try_model(
        prompt: Annotated[
            str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user message")
        ],
        job_id: Annotated[
            str | None,
            name_arg("a succeeded fine-tune job: its base model plus its adapter"),
        ] = None,
        model: Annotated[
            str | None,
            path_arg("a base or merged model (preset, folder or hub name) when no job_id"),
        ] = None,
        adapter_path: Annotated[
            str | None,
            path_arg("a LoRA adapter folder to apply to model"),
        ] = None,
        system: Annotated[
            str | None, Field(max_length=MAX_SYSTEM_CHARS, description="a system prompt")
        ] = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 128,
        temperature: Annotated[float, Field(ge=0, le=2, description="0 = greedy")] = 0.0,
        max_time_s: Annotated[float, Field(gt=0, le=40, description="generation time limit")] = 20.0,
        *,
        roots: ClientRoots,
    ) -> Generation:
        """Generate a reply with the chat template applied, from a base model, a finished job's adapter
        or a merged model, to see what training changed. Bounded in time (model loading included, under a minute)."""
        require_extra("train", "try_model")
        base, adapter = _generation_target(job_id, model, adapter_path)
        args = {
            "model": base,
            "adapter": adapter,
            "prompt": prompt,
            "system": system,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "max_time_s": max_time_s,
        }
        timeout = min(TRY_MODEL_CEILING_S, max_time_s + TRY_MODEL_LOAD_ALLOWANCE_S)
        try:
            out = call_engine("generate", args, timeout_s=timeout, home=lazy.get().home)
        except EngineCallError as exc:
            raise ToolError(f"generation failed: {exc}") from exc
        return Generation(
            text=str(out.get("text", "")),
            model=base,
            adapter=adapter,
            new_tokens=int(out.get("new_tokens", 0)),
            seconds=float(out.get("seconds", 0.0)),
            stopped_by_time=bool(out.get("stopped_by_time", False)),
            prompt=str(out.get("prompt", "")),
        )

    def _generation_target(
        job_id: str | None, model: str | None, adapter_path: str | None
    ) -> tuple[str, str | None]:
        if job_id:
            if model or adapter_path:
                raise ToolError("give either job_id, or model (with an optional adapter_path), not both.")
            record = find_job(job_id)
            checks.trained_job(
                record, "try_model", " Use job_status to follow it, or give model= to try a base model."
            )
            spec = read_spec(record.job_dir)
            status = lazy.get().status(record)
            adapter = status.artifacts.get("adapter") or str(record.job_dir / "adapter")
            if not Path(adapter).is_dir():
                raise ToolError(
                    f"job {record.id} has no adapter folder ({adapter}); it may have been deleted."
                )
            return str(getattr(spec, "model", "tiny")), adapter
        if not model:
            raise ToolError("give job_id (a finished fine-tune) or model (a preset, folder or hub name).")
        folder = str(checks.adapter_folder(adapter_path)) if adapter_path else None
        return checks.permitted_model(model), folder

    register_resources(server, lazy.get, find_job, legacy)
    for tool in server._tool_manager.list_tools():  # Python < 3.13 keeps the docstrings' indentation
        tool.description = inspect.cleandoc(tool.description)
    listen_for_roots_changes(server)
    guard_tools(server)  # last: wraps every tool registered above
    return server


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


server = build_server()
