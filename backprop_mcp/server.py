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

import json
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
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
from mcp.types import EmptyResult, SubscribeRequestParams, ToolAnnotations, UnsubscribeRequestParams
from pydantic import BaseModel, Field, ValidationError

from backprop_mcp import __version__, checks
from backprop_mcp.app import LINKED_TOOL_META, dashboard_extension, hide_from_plain_hosts
from backprop_mcp.engine_calls import EngineCallError, call_engine
from backprop_mcp.gpu import gpu_report
from backprop_mcp.lossplot import render_loss_png
from backprop_mcp.models import (
    CancelResult,
    DatasetCheck,
    Generation,
    GpuReport,
    JobList,
    JobStatus,
    StartedJob,
)
from backprop_mcp.paths import check_job_id, resolve_readable
from backprop_mcp.state import GPU_URI, JOBS_URI, ServerState, job_uri, progress_of
from backprop_mcp.store import JobRecord
from engine.interface import (
    DatasetSettings,
    ExportQuant,
    ExportSpec,
    FinetuneSpec,
    LoraSettings,
    MergeMode,
    SeriesSpec,
    TrainSettings,
    read_spec,
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


def setting(model: type[BaseModel], name: str) -> Any:
    """A tool argument's bounds and description, taken from the job spec's field (one source of truth).

    Defaults stay in the tool's signature, where the SDK reads them; a test checks they equal the spec's.
    """
    source = model.model_fields[name]
    field = Field(description=source.description)
    field.metadata = list(source.metadata)
    return field


def _hints(*, read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )


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


class LegacySubscriptions:
    """``resources/subscribe`` (2025-11-25): which connections want which URIs."""

    def __init__(self) -> None:
        self._by_uri: dict[str, dict[int, Any]] = {}

    @staticmethod
    def _key(session: Any) -> int:
        # One entry per connection: each request gets its own session proxy over one connection.
        return id(getattr(session, "_connection", session))

    def add(self, uri: str, session: Any) -> None:
        self._by_uri.setdefault(uri, {})[self._key(session)] = session

    def remove(self, uri: str, session: Any) -> None:
        self._by_uri.get(uri, {}).pop(self._key(session), None)

    async def notify(self, uri: str) -> None:
        for key, session in list(self._by_uri.get(uri, {}).items()):
            try:
                await session.send_resource_updated(uri)
            except Exception as exc:  # a closed connection: forget it
                log.debug("dropping subscriber of %s: %s", uri, exc)
                self._by_uri.get(uri, {}).pop(key, None)


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

    server = MCPServer(
        "backprop-mcp",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        subscriptions=bus,
        extensions=[dashboard_extension(lazy.get)],  # the job dashboard app (backprop_mcp/app.py)
        middleware=[hide_from_plain_hosts],
    )

    async def in_thread(fn: Callable[..., _T], *args: Any) -> _T:
        return await anyio.to_thread.run_sync(lambda: fn(*args))

    def find_job(job_id: str) -> JobRecord:
        job_id = check_job_id(job_id)
        state = lazy.get()
        record = state.get_record(job_id)
        if record is None:
            raise ToolError(f"no job {job_id!r} in {state.home}. Call list_jobs to see the existing job ids.")
        return record

    def create(spec: BaseModel, label: str, notes: list[str]) -> StartedJob:
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

    @server.tool(
        name="inspect_gpu",
        title="Inspect GPUs",
        annotations=_hints(read_only=True, destructive=False, idempotent=True, open_world=False),
    )
    def inspect_gpu() -> GpuReport:
        """Describe this machine's GPUs (memory total/free/used, utilisation, temperature, power,
        compute capability, bf16 support, driver and CUDA versions) and which model presets fit.
        On a machine without an NVIDIA GPU it says so and what still works (CPU training of small models)."""
        return gpu_report()

    @server.tool(
        name="start_finetune",
        title="Start a LoRA/QLoRA fine-tune",
        annotations=_hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def start_finetune(
        dataset_path: Annotated[
            str,
            Field(
                description="absolute path of a JSONL/JSON/CSV/Parquet file or saved `datasets` folder "
                "(chat 'messages', 'prompt'/'completion' or 'text' rows), or a hub dataset name"
            ),
        ],
        model: Annotated[
            str, Field(description="preset name (e.g. 'tiny'), local model folder, or hub name")
        ] = "tiny",
        steps: Annotated[int | None, setting(TrainSettings, "steps")] = None,
        epochs: Annotated[float | None, setting(TrainSettings, "epochs")] = None,
        learning_rate: Annotated[float | None, setting(TrainSettings, "learning_rate")] = None,
        max_seq_length: Annotated[int | None, setting(TrainSettings, "max_seq_length")] = None,
        micro_batch_size: Annotated[int | None, setting(TrainSettings, "micro_batch_size")] = None,
        gradient_accumulation: Annotated[int | None, setting(TrainSettings, "gradient_accumulation")] = None,
        lora_rank: Annotated[int, setting(LoraSettings, "rank")] = 16,
        lora_alpha: Annotated[float | None, setting(LoraSettings, "alpha")] = None,
        quantization: Annotated[
            Literal["auto", "4bit", "16bit", "none"],
            Field(description="auto: 4-bit QLoRA on a GPU, full precision on CPU"),
        ] = "auto",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        gpu_index: Annotated[int, Field(ge=0)] = 0,
        eval_fraction: Annotated[float, setting(DatasetSettings, "eval_fraction")] = 0.0,
        skip_bad_rows: Annotated[bool, setting(DatasetSettings, "skip_bad_rows")] = False,
        packing: Annotated[bool | None, setting(TrainSettings, "packing")] = None,
        checkpoint_every: Annotated[int | None, setting(TrainSettings, "checkpoint_every")] = None,
        seed: int = 42,
    ) -> StartedJob:
        """Start fine-tuning a model on a dataset as a background job and return its id at once.
        Every setting is optional: smart defaults fill them from the data and the GPU. The dataset and
        settings are checked first (missing file, malformed rows, bad values: an error, nothing created).
        Follow the job with job_status(job_id, wait_s=30)."""
        data_path = checks.dataset_path(dataset_path)
        model_name = checks.check_model(model)
        try:
            spec = FinetuneSpec.model_validate(
                {
                    "model": model_name,
                    "quantization": quantization,
                    "device": device,
                    "gpu_index": gpu_index,
                    "dataset": {
                        "path": data_path,
                        "skip_bad_rows": skip_bad_rows,
                        "eval_fraction": eval_fraction,
                    },
                    "lora": {"rank": lora_rank, "alpha": lora_alpha},
                    "train": {
                        k: v
                        for k, v in {
                            "steps": steps,
                            "epochs": epochs,
                            "learning_rate": learning_rate,
                            "max_seq_length": max_seq_length,
                            "micro_batch_size": micro_batch_size,
                            "gradient_accumulation": gradient_accumulation,
                            "packing": packing,
                            "checkpoint_every": checkpoint_every,
                            "seed": seed,
                        }.items()
                        if v is not None
                    },
                }
            )
        except ValidationError as exc:
            raise ToolError(
                f"invalid settings: {checks.validation_message(exc)}. Fix them and call again."
            ) from exc
        notes = checks.preflight(spec)
        return create(spec, f"{Path(model_name).name} on {Path(data_path).name}", notes)

    @server.tool(
        name="job_status",
        title="Job status (can wait for progress)",
        annotations=_hints(read_only=True, destructive=False, idempotent=True, open_world=False),
        meta=LINKED_TOOL_META,
    )
    async def job_status(
        job_id: Annotated[str, Field(description="the id start_finetune (or list_jobs) gave")],
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
        return await in_thread(state.status, record)

    @server.tool(
        name="list_jobs",
        title="List jobs",
        annotations=_hints(read_only=True, destructive=False, idempotent=True, open_world=False),
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
        annotations=_hints(read_only=False, destructive=True, idempotent=True, open_world=False),
    )
    def cancel_job(
        job_id: str,
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
        annotations=_hints(read_only=True, destructive=False, idempotent=True, open_world=True),
    )
    def check_dataset(
        path: Annotated[
            str, Field(description="absolute path of the dataset file or folder (or a hub dataset name)")
        ],
        model: Annotated[
            str, Field(description="the model whose tokenizer and chat template to measure with")
        ] = "tiny",
        max_seq_length: Annotated[int | None, setting(TrainSettings, "max_seq_length")] = None,
        micro_batch_size: Annotated[int | None, setting(TrainSettings, "micro_batch_size")] = None,
        quantization: Literal["auto", "4bit", "16bit", "none"] = "auto",
        lora_rank: Annotated[int, setting(LoraSettings, "rank")] = 16,
    ) -> DatasetCheck:
        """Check a dataset before training: format detected, row count, bad rows with line numbers,
        token-length statistics with the model's tokenizer and chat template, whether it fits, and the
        defaults (sequence length, batch, steps, memory) a fine-tune would use."""
        data_path = checks.dataset_path(path)
        model_name = checks.check_model(model)
        args = {
            "path": data_path,
            "model": model_name,
            "max_seq_length": max_seq_length,
            "micro_batch_size": micro_batch_size,
            "quantization": quantization,
            "lora_rank": lora_rank,
        }
        try:
            out = call_engine("check-data", args, timeout_s=CHECK_DATA_TIMEOUT_S, home=lazy.get().home)
        except EngineCallError as exc:
            raise ToolError(f"checking {data_path} failed: {exc}") from exc
        return checks.dataset_check_result(data_path, out)

    @server.tool(
        name="try_model",
        title="Try a model on a prompt",
        annotations=_hints(read_only=True, destructive=False, idempotent=True, open_world=True),
    )
    def try_model(
        prompt: Annotated[str, Field(min_length=1, description="the user message")],
        job_id: Annotated[
            str | None, Field(description="a succeeded fine-tune job: its base model plus its adapter")
        ] = None,
        model: Annotated[
            str | None,
            Field(description="a base or merged model (preset, folder or hub name) when no job_id"),
        ] = None,
        adapter_path: Annotated[
            str | None, Field(description="a LoRA adapter folder to apply to model")
        ] = None,
        system: str | None = None,
        max_new_tokens: Annotated[int, Field(ge=1, le=1024)] = 128,
        temperature: Annotated[float, Field(ge=0, le=2, description="0 = greedy")] = 0.0,
        max_time_s: Annotated[float, Field(gt=0, le=40, description="generation time limit")] = 20.0,
    ) -> Generation:
        """Generate a reply with the chat template applied, from a base model, a finished job's adapter
        or a merged model, to see what training changed. Bounded in time (model loading included, under a minute)."""
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
            if record.state != "succeeded" or record.kind not in ("finetune", "slao_series"):
                raise ToolError(
                    f"job {record.id} is a {record.kind} job in state '{record.state}'; try_model needs a succeeded "
                    "fine-tune or SLAO series. Use job_status to follow it, or give model= to try a base model."
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
        given = str(resolve_readable(adapter_path, "adapter_path")) if adapter_path else None
        if given and not (Path(given) / "adapter_config.json").exists():
            raise ToolError(f"adapter_path: {given} has no adapter_config.json; give a PEFT adapter folder.")
        return checks.check_model(model), given

    @server.tool(
        name="run_slao_series",
        title="Start a multi-run SLAO series",
        annotations=_hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def run_slao_series(
        dataset_paths: Annotated[
            list[str],
            Field(
                min_length=1,
                description="one dataset split into num_runs slices, or one dataset per task/run",
            ),
        ],
        model: str = "tiny",
        num_runs: Annotated[int | None, setting(SeriesSpec, "num_runs")] = None,
        steps_per_run: Annotated[int | None, setting(SeriesSpec, "steps_per_run")] = None,
        samples_per_run: Annotated[int | None, setting(SeriesSpec, "samples_per_run")] = None,
        merge_mode: Annotated[MergeMode, setting(SeriesSpec, "merge_mode")] = "slao",
        replay_fraction: Annotated[float, setting(SeriesSpec, "replay_fraction")] = 0.0,
        heldout_fraction: Annotated[float, setting(SeriesSpec, "heldout_fraction")] = 0.1,
        lora_rank: Annotated[int, setting(LoraSettings, "rank")] = 16,
        quantization: Literal["auto", "4bit", "16bit", "none"] = "auto",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        learning_rate: Annotated[float | None, setting(TrainSettings, "learning_rate")] = None,
        max_seq_length: Annotated[int | None, setting(TrainSettings, "max_seq_length")] = None,
        skip_bad_rows: bool = False,
    ) -> StartedJob:
        """Start a continual-learning series as one background job: N runs over successive data slices
        (or one dataset per task), merging each run's LoRA into the accumulated adapter with SLAO so new
        data is learnt without forgetting the old, and an evaluation matrix across runs."""
        model_name = checks.check_model(model)
        datasets = [{"path": checks.dataset_path(p), "skip_bad_rows": skip_bad_rows} for p in dataset_paths]
        train = {
            k: v for k, v in {"learning_rate": learning_rate, "max_seq_length": max_seq_length}.items() if v
        }
        try:
            spec = SeriesSpec.model_validate(
                {
                    "model": model_name,
                    "quantization": quantization,
                    "device": device,
                    "datasets": datasets,
                    "num_runs": num_runs,
                    "steps_per_run": steps_per_run,
                    "samples_per_run": samples_per_run,
                    "merge_mode": merge_mode,
                    "replay_fraction": replay_fraction,
                    "heldout_fraction": heldout_fraction,
                    "lora": {"rank": lora_rank},
                    "train": train,
                }
            )
        except ValidationError as exc:
            raise ToolError(
                f"invalid series settings: {checks.validation_message(exc)}. Fix them and call again."
            ) from exc
        notes = checks.preflight(spec)
        runs = spec.num_runs or len(datasets)
        return create(spec, f"{Path(model_name).name}, {runs} SLAO runs", notes)

    @server.tool(
        name="export_gguf",
        title="Export to GGUF (llama.cpp / Ollama)",
        annotations=_hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def export_gguf(
        job_id: Annotated[
            str | None, Field(description="a succeeded fine-tune or series job to export")
        ] = None,
        adapter_path: Annotated[str | None, Field(description="or: a LoRA adapter folder")] = None,
        base_model: Annotated[
            str | None, Field(description="base model; default: the one the job trained")
        ] = None,
        quantizations: Annotated[list[ExportQuant], Field(min_length=1)] = ["q4_k_m"],  # noqa: B006 - pydantic copies it
        adapter_gguf: Annotated[bool, Field(description="also write the LoRA adapter as GGUF")] = False,
        verify: Annotated[bool, Field(description="check the GGUF's logits against the merged model")] = True,
        register_ollama: bool = False,
        ollama_name: Annotated[
            str | None, Field(description="model name in Ollama, e.g. 'my-assistant'")
        ] = None,
        system_prompt: str | None = None,
    ) -> StartedJob:
        """Export a fine-tuned model as a background job: merge the adapter into its base model, convert
        to GGUF, quantize (q4_k_m by default), verify against the original, and optionally register the
        result with a local Ollama. Follow it with job_status."""
        if bool(job_id) == bool(adapter_path):
            raise ToolError(
                "give exactly one of job_id (a succeeded training job) or adapter_path (an adapter folder)."
            )
        if job_id:
            record = find_job(job_id)
            if record.state != "succeeded" or record.kind not in ("finetune", "slao_series"):
                raise ToolError(
                    f"job {record.id} is a {record.kind} job in state '{record.state}'; export needs a succeeded "
                    "fine-tune or SLAO series job."
                )
            source, label = str(record.job_dir), record.id
        else:
            folder = resolve_readable(str(adapter_path), "adapter_path")
            if not (folder / "adapter_config.json").exists():
                raise ToolError(
                    f"adapter_path: {folder} has no adapter_config.json; give a PEFT adapter folder."
                )
            source, label = str(folder), folder.name
        if register_ollama and not ollama_name:
            raise ToolError("register_ollama=true needs ollama_name (the name to give the model in Ollama).")
        try:
            spec = ExportSpec.model_validate(
                {
                    "source": source,
                    "base_model": checks.check_model(base_model) if base_model else None,
                    "quantizations": quantizations,
                    "adapter_gguf": adapter_gguf,
                    "verify": verify,
                    "register_ollama": register_ollama,
                    "ollama_name": ollama_name,
                    "system_prompt": system_prompt,
                }
            )
        except ValidationError as exc:
            raise ToolError(
                f"invalid export settings: {checks.validation_message(exc)}. Fix them and call again."
            ) from exc
        return create(spec, f"GGUF {','.join(spec.quantizations)} of {label}", [])

    # -- resources --------------------------------------------------------------------------------

    def resource_job(job_id: str) -> JobRecord:
        try:
            return find_job(job_id)
        except ToolError as exc:
            raise ResourceNotFoundError(str(exc)) from exc

    @server.resource(JOBS_URI, name="jobs", title="All jobs", mime_type="application/json")
    def jobs_resource() -> str:
        """Every job in the state folder, newest first."""
        return lazy.get().job_list(limit=200).model_dump_json(indent=1)

    @server.resource(f"{JOBS_URI}/{{job_id}}", name="job", title="Job status", mime_type="application/json")
    def job_resource(job_id: str) -> str:
        """One job's status: state, progress, metrics, artifacts, error."""
        return lazy.get().status(resource_job(job_id)).model_dump_json(indent=1)

    @server.resource(
        f"{JOBS_URI}/{{job_id}}/events",
        name="job_events",
        title="Recent job events",
        mime_type="application/json",
    )
    def job_events_resource(job_id: str) -> str:
        """The job's most recent events (progress, stages, warnings, errors), oldest first."""
        state = lazy.get()
        return json.dumps(
            {"job_id": job_id, "events": state.recent_events(resource_job(job_id))}, default=str
        )

    @server.resource(
        f"{JOBS_URI}/{{job_id}}/loss.png", name="job_loss", title="Loss curve", mime_type="image/png"
    )
    def job_loss_resource(job_id: str) -> bytes:
        """The training loss (blue) and evaluation loss (orange) against the step, as a PNG."""
        record = resource_job(job_id)
        tail = lazy.get().supervisor.tail(record)
        return render_loss_png(list(tail.loss), list(tail.eval_loss))

    @server.resource(GPU_URI, name="gpu", title="GPU state", mime_type="application/json")
    def gpu_resource() -> str:
        """The GPUs' current memory, utilisation and temperature (same as inspect_gpu)."""
        return gpu_report().model_dump_json(indent=1)

    # -- resources/subscribe for 2025-11-25 clients (2026-07-28 uses subscriptions/listen) ------

    async def on_subscribe(ctx: Any, params: SubscribeRequestParams) -> EmptyResult:
        legacy.add(str(params.uri), ctx.session)
        return EmptyResult()

    async def on_unsubscribe(ctx: Any, params: UnsubscribeRequestParams) -> EmptyResult:
        legacy.remove(str(params.uri), ctx.session)
        return EmptyResult()

    server._lowlevel_server.add_request_handler("resources/subscribe", SubscribeRequestParams, on_subscribe)
    server._lowlevel_server.add_request_handler(
        "resources/unsubscribe", UnsubscribeRequestParams, on_unsubscribe
    )
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
