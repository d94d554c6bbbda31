"""The tools that start jobs: ``start_finetune``, ``run_slao_series`` and ``export_gguf``.

Each validates its arguments (bounds from the spec models, then the engine's preflight), creates
nothing on a refusal, and otherwise starts a detached worker and returns the job's id at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from backprop_mcp import checks
from backprop_mcp.app import LINKED_TOOL_META
from backprop_mcp.limits import MAX_DATASETS, MAX_SYSTEM_CHARS
from backprop_mcp.paths import resolve_writable_dir
from backprop_mcp.policy import ClientRoots
from backprop_mcp.reward_policy import check_reward_code
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_outputs import StartedJob
from backprop_mcp.tooling import LEFT_OUT, hints, name_arg, path_arg, takes_settings
from engine.interface import (
    ExportSpec,
    FinetuneSpec,
    SeriesSpec,
    require_extra,
    require_for_spec,
    training_spec,
)

Create = Callable[[checks.JobSpec, str], StartedJob]
_STARTS_A_JOB = hints(read_only=False, destructive=False, idempotent=False, open_world=True)


def register_job_tools(server: MCPServer, find_job: Callable[[str], JobRecord], create: Create) -> None:
    _start_finetune(server, find_job, create)
    _run_slao_series(server, create)
    _export_gguf(server, find_job, create)


def _start_finetune(server: MCPServer, find_job: Callable[[str], JobRecord], create: Create) -> None:
    @server.tool(
        name="start_finetune",
        title="Start a LoRA/QLoRA fine-tune",
        annotations=_STARTS_A_JOB,
        meta=LINKED_TOOL_META,
    )
    @takes_settings(
        FinetuneSpec,
        leave_out=LEFT_OUT["start_finetune"],
        model=path_arg(),
        init_adapter=path_arg(
            "start from this LoRA adapter: a succeeded fine-tune's job id, or an absolute path of a PEFT adapter "
            "folder; for dpo and kto its frozen copy is the reference"
        ),
    )
    def start_finetune(
        dataset_path: Annotated[
            str,
            path_arg(
                "absolute path of a JSONL/JSON/CSV/Parquet file or saved `datasets` folder "
                "(chat 'messages', 'prompt'/'completion' or 'text' rows; for method dpo/orpo 'prompt'/'chosen'/"
                "'rejected' pairs, for kto 'prompt'/'completion'/'label'), or a hub dataset name"
            ),
        ],
        *,
        roots: ClientRoots,
        **settings: Any,
    ) -> StartedJob:
        """Start fine-tuning a model on a dataset as a background job and return its id at once.
        Every setting is optional: smart defaults fill them from the data and the GPU. The dataset and
        settings are checked first (missing file, malformed rows, bad values: an error, nothing created).
        Follow the job with job_status(job_id, wait_s=30)."""
        data_path = checks.dataset_path(dataset_path)
        settings["model"] = checks.permitted_model(settings["model"])
        if settings.get("init_adapter"):
            settings["init_adapter"] = checks.initial_adapter(settings["init_adapter"], find_job)
        spec = checks.validated(training_spec, "settings", FinetuneSpec, data_path, **settings)
        spec = check_reward_code(spec)  # a python reward runs code: only where the server allows it
        require_for_spec(spec, "start_finetune")  # the extras this spec uses (train; unsloth for its backend)
        return create(spec, f"{Path(spec.model).name} on {Path(data_path).name}")


def _run_slao_series(server: MCPServer, create: Create) -> None:
    @server.tool(
        name="run_slao_series",
        title="Start a multi-run SLAO series",
        annotations=_STARTS_A_JOB,
        meta=LINKED_TOOL_META,
    )
    @takes_settings(SeriesSpec, leave_out=LEFT_OUT["run_slao_series"], model=path_arg())
    def run_slao_series(
        dataset_paths: Annotated[
            list[Annotated[str, path_arg()]],
            Field(
                min_length=1,
                max_length=MAX_DATASETS,
                description="one dataset split into num_runs slices, or one dataset per task/run",
            ),
        ],
        *,
        roots: ClientRoots,
        **settings: Any,
    ) -> StartedJob:
        """Start a continual-learning series as one background job: N runs over successive data slices
        (or one dataset per task), merging each run's LoRA into the accumulated adapter with SLAO so new
        data is learnt without forgetting the old, and an evaluation matrix across runs."""
        require_extra("train", "run_slao_series")
        settings["model"] = checks.permitted_model(settings["model"])
        paths = [checks.dataset_path(p) for p in dataset_paths]
        spec = checks.validated(training_spec, "series settings", SeriesSpec, paths, **settings)
        return create(spec, f"{Path(spec.model).name}, {settings['num_runs'] or len(paths)} SLAO runs")


def _export_gguf(server: MCPServer, find_job: Callable[[str], JobRecord], create: Create) -> None:
    @server.tool(
        name="export_gguf",
        title="Export to GGUF (llama.cpp / Ollama)",
        annotations=_STARTS_A_JOB,
        meta=LINKED_TOOL_META,
    )
    @takes_settings(
        ExportSpec,
        leave_out=LEFT_OUT["export_gguf"],
        base_model=path_arg("base model; default: the one the job trained"),
        ollama_name=name_arg("model name in Ollama, e.g. 'my-assistant'"),
        system_prompt=Field(max_length=MAX_SYSTEM_CHARS),
        output_dir=path_arg("absolute folder for the GGUF files and Modelfile (default: the job's)"),
    )
    def export_gguf(
        job_id: Annotated[str | None, name_arg("a succeeded fine-tune or series job to export")] = None,
        adapter_path: Annotated[str | None, path_arg("or: a LoRA adapter folder")] = None,
        *,
        roots: ClientRoots,
        **settings: Any,
    ) -> StartedJob:
        """Export a fine-tuned model as a background job: merge the adapter into its base model, convert
        to GGUF, quantize (q4_k_m by default), verify against the original, and optionally register the
        result with a local Ollama. Follow it with job_status."""
        require_extra("export", "export_gguf")
        if bool(job_id) == bool(adapter_path):
            raise ToolError(
                "give exactly one of job_id (a succeeded training job) or adapter_path (an adapter folder)."
            )
        if job_id:
            record = find_job(job_id)
            checks.trained_job(record, "export")
            source, label = str(record.job_dir), record.id
        else:
            folder = checks.adapter_folder(str(adapter_path))
            source, label = str(folder), folder.name
        if settings["register_ollama"] and not settings["ollama_name"]:
            raise ToolError("register_ollama=true needs ollama_name (the name to give the model in Ollama).")
        if settings["base_model"]:
            settings["base_model"] = checks.permitted_model(settings["base_model"])
        if settings["output_dir"]:
            settings["output_dir"] = str(resolve_writable_dir(settings["output_dir"], "output_dir"))
        spec = checks.validated(ExportSpec, "export settings", source=source, **settings)
        return create(spec, f"GGUF {','.join(spec.quantizations)} of {label}")
