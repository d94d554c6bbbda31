"""The tools answered within the call: ``inspect_gpu``, ``check_dataset`` and ``try_model`` (the last
two through a bounded engine subprocess, engine_calls.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from backprop_mcp import checks
from backprop_mcp.engine_calls import EngineCallError, call_engine
from backprop_mcp.job_views import ServerState
from backprop_mcp.limits import MAX_PROMPT_CHARS, MAX_SYSTEM_CHARS
from backprop_mcp.policy import ClientRoots
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_outputs import DatasetCheck, Generation
from backprop_mcp.tooling import CHECK_DATASET_TAKES, hints, name_arg, path_arg, takes_settings
from engine.interface import FinetuneSpec, GpuReport, gpu_report, quoted, read_spec, require_extra

CHECK_DATA_TIMEOUT_S = 55.0  # under the ~60 s after which clients drop a call
TRY_MODEL_LOAD_ALLOWANCE_S = 30.0
TRY_MODEL_CEILING_S = 55.0
READ_ONLY_OPEN = hints(read_only=True, destructive=False, idempotent=True, open_world=True)


def register_inspect_tools(
    server: MCPServer, get_state: Callable[[], ServerState], find_job: Callable[[str], JobRecord]
) -> None:
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

    @server.tool(name="check_dataset", title="Check a dataset", annotations=READ_ONLY_OPEN)
    @takes_settings(
        FinetuneSpec,
        only=CHECK_DATASET_TAKES,
        model=path_arg("the model whose tokenizer and chat template to measure with"),
    )
    def check_dataset(
        path: Annotated[str, path_arg("absolute path of the dataset file or folder (or a hub dataset name)")],
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
            out = call_engine("check-data", args, timeout_s=CHECK_DATA_TIMEOUT_S, home=get_state().home)
        except EngineCallError as exc:
            raise ToolError(f"checking {quoted(data_path)} failed: {exc}") from exc
        return checks.dataset_check_result(data_path, out)

    _try_model(server, get_state, find_job)


def _try_model(
    server: MCPServer, get_state: Callable[[], ServerState], find_job: Callable[[str], JobRecord]
) -> None:
    @server.tool(name="try_model", title="Try a model on a prompt", annotations=READ_ONLY_OPEN)
    def try_model(
        prompt: Annotated[
            str, Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="the user message")
        ],
        job_id: Annotated[
            str | None, name_arg("a succeeded fine-tune job: its base model plus its adapter")
        ] = None,
        model: Annotated[
            str | None, path_arg("a base or merged model (preset, folder or hub name) when no job_id")
        ] = None,
        adapter_path: Annotated[str | None, path_arg("a LoRA adapter folder to apply to model")] = None,
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
        adapter: str | None
        if job_id:
            if model or adapter_path:
                raise ToolError("give either job_id, or model (with an optional adapter_path), not both.")
            base, adapter = _trained_job_target(get_state(), find_job(job_id))
        elif not model:
            raise ToolError("give job_id (a finished fine-tune) or model (a preset, folder or hub name).")
        else:
            base = checks.permitted_model(model)
            adapter = str(checks.adapter_folder(adapter_path)) if adapter_path else None
        args = {"model": base, "adapter": adapter, "prompt": prompt, "system": system,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "max_time_s": max_time_s}  # fmt: skip
        timeout = min(TRY_MODEL_CEILING_S, max_time_s + TRY_MODEL_LOAD_ALLOWANCE_S)
        try:
            out = call_engine("generate", args, timeout_s=timeout, home=get_state().home)
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


def _trained_job_target(state: ServerState, record: JobRecord) -> tuple[str, str]:
    """(base model, adapter folder) of a succeeded fine-tune job."""
    checks.trained_job(
        record, "try_model", " Use job_status to follow it, or give model= to try a base model."
    )
    spec = read_spec(record.job_dir)
    adapter = state.status(record).artifacts.get("adapter") or str(record.job_dir / "adapter")
    if not Path(adapter).is_dir():
        raise ToolError(f"job {record.id} has no adapter folder ({adapter}); it may have been deleted.")
    return str(getattr(spec, "model", "tiny")), adapter
