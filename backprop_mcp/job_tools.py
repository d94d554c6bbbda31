"""The tools that start jobs: ``start_finetune``, ``run_slao_series`` and ``export_gguf``.

Each validates its arguments (bounds from the spec models, then the engine's preflight), creates
nothing on a refusal, and otherwise starts a detached worker and returns the job's id at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from backprop_mcp import checks
from backprop_mcp.app import LINKED_TOOL_META
from backprop_mcp.job_views import ServerState
from backprop_mcp.limits import MAX_DATASETS, MAX_SYSTEM_CHARS
from backprop_mcp.paths import resolve_writable_dir
from backprop_mcp.policy import ClientRoots
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_outputs import StartedJob
from backprop_mcp.tooling import hints, name_arg, path_arg, setting
from engine.interface import (
    DeviceChoice,
    ExportQuant,
    ExportSpec,
    FinetuneSpec,
    MergeMode,
    Quantization,
    SeriesSpec,
    require_extra,
    require_for_spec,
    training_spec,
)


def register_job_tools(
    server: MCPServer,
    state: Callable[[], ServerState],
    find_job: Callable[[str], JobRecord],
    create: Callable[[checks.JobSpec, str], StartedJob],
) -> None:
    @server.tool(
        name="start_finetune",
        title="Start a LoRA/QLoRA fine-tune",
        annotations=hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def start_finetune(
        dataset_path: Annotated[
            str,
            path_arg(
                "absolute path of a JSONL/JSON/CSV/Parquet file or saved `datasets` folder "
                "(chat 'messages', 'prompt'/'completion' or 'text' rows), or a hub dataset name"
            ),
        ],
        model: Annotated[
            str,
            path_arg("preset name (e.g. 'tiny'), local model folder, or hub name"),
        ] = "tiny",
        steps: Annotated[int | None, setting("steps")] = None,
        epochs: Annotated[float | None, setting("epochs")] = None,
        learning_rate: Annotated[float | None, setting("learning_rate")] = None,
        max_seq_length: Annotated[int | None, setting("max_seq_length")] = None,
        micro_batch_size: Annotated[int | None, setting("micro_batch_size")] = None,
        gradient_accumulation: Annotated[int | None, setting("gradient_accumulation")] = None,
        lora_rank: Annotated[int, setting("lora_rank")] = 16,
        lora_alpha: Annotated[float | None, setting("lora_alpha")] = None,
        quantization: Annotated[Quantization, setting("quantization")] = "auto",
        device: Annotated[DeviceChoice, setting("device")] = "auto",
        gpu_index: Annotated[int, setting("gpu_index")] = 0,
        gpus: Annotated[list[Annotated[int, Field(ge=0)]] | Literal["all"] | None, setting("gpus")] = None,
        parallel: Annotated[Literal["auto", "ddp", "fsdp"], setting("parallel")] = "auto",
        eval_fraction: Annotated[float, setting("eval_fraction")] = 0.0,
        skip_bad_rows: Annotated[bool, setting("skip_bad_rows")] = False,
        packing: Annotated[bool | None, setting("packing")] = None,
        checkpoint_every: Annotated[int | None, setting("checkpoint_every")] = None,
        seed: int = 42,
        backend: Annotated[Literal["auto", "native", "unsloth"], setting("backend")] = "auto",
        *,
        roots: ClientRoots,
    ) -> StartedJob:
        """Start fine-tuning a model on a dataset as a background job and return its id at once.
        Every setting is optional: smart defaults fill them from the data and the GPU. The dataset and
        settings are checked first (missing file, malformed rows, bad values: an error, nothing created).
        Follow the job with job_status(job_id, wait_s=30)."""
        data_path = checks.dataset_path(dataset_path)
        model_name = checks.check_model(model)
        spec = checks.validated(
            training_spec,
            "settings",
            FinetuneSpec,
            data_path,
            model=model_name,
            steps=steps,
            epochs=epochs,
            learning_rate=learning_rate,
            max_seq_length=max_seq_length,
            micro_batch_size=micro_batch_size,
            gradient_accumulation=gradient_accumulation,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            quantization=quantization,
            device=device,
            gpu_index=gpu_index,
            gpus=gpus,
            parallel=parallel,
            eval_fraction=eval_fraction,
            skip_bad_rows=skip_bad_rows,
            packing=packing,
            checkpoint_every=checkpoint_every,
            seed=seed,
            backend=backend,
        )
        require_for_spec(spec, "start_finetune")  # the extras this spec uses (train; unsloth for its backend)
        return create(spec, f"{Path(model_name).name} on {Path(data_path).name}")

    @server.tool(
        name="run_slao_series",
        title="Start a multi-run SLAO series",
        annotations=hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def run_slao_series(
        dataset_paths: Annotated[
            list[Annotated[str, path_arg()]],
            Field(
                min_length=1,
                max_length=MAX_DATASETS,
                description="one dataset split into num_runs slices, or one dataset per task/run",
            ),
        ],
        model: Annotated[str, path_arg()] = "tiny",
        num_runs: Annotated[int | None, setting("num_runs")] = None,
        steps_per_run: Annotated[int | None, setting("steps_per_run")] = None,
        samples_per_run: Annotated[int | None, setting("samples_per_run")] = None,
        merge_mode: Annotated[MergeMode, setting("merge_mode")] = "slao",
        replay_fraction: Annotated[float, setting("replay_fraction")] = 0.0,
        heldout_fraction: Annotated[float, setting("heldout_fraction")] = 0.1,
        lora_rank: Annotated[int, setting("lora_rank")] = 16,
        quantization: Annotated[Quantization, setting("quantization")] = "auto",
        device: Annotated[DeviceChoice, setting("device")] = "auto",
        gpus: Annotated[list[Annotated[int, Field(ge=0)]] | Literal["all"] | None, setting("gpus")] = None,
        parallel: Annotated[Literal["auto", "ddp", "fsdp"], setting("parallel")] = "auto",
        learning_rate: Annotated[float | None, setting("learning_rate")] = None,
        max_seq_length: Annotated[int | None, setting("max_seq_length")] = None,
        skip_bad_rows: bool = False,
        *,
        roots: ClientRoots,
    ) -> StartedJob:
        """Start a continual-learning series as one background job: N runs over successive data slices
        (or one dataset per task), merging each run's LoRA into the accumulated adapter with SLAO so new
        data is learnt without forgetting the old, and an evaluation matrix across runs."""
        require_extra("train", "run_slao_series")
        model_name = checks.check_model(model)
        spec = checks.validated(
            training_spec,
            "series settings",
            SeriesSpec,
            [checks.dataset_path(p) for p in dataset_paths],
            model=model_name,
            quantization=quantization,
            device=device,
            gpus=gpus,
            parallel=parallel,
            num_runs=num_runs,
            steps_per_run=steps_per_run,
            samples_per_run=samples_per_run,
            merge_mode=merge_mode,
            replay_fraction=replay_fraction,
            heldout_fraction=heldout_fraction,
            lora_rank=lora_rank,
            learning_rate=learning_rate,
            max_seq_length=max_seq_length,
            skip_bad_rows=skip_bad_rows,
        )
        return create(spec, f"{Path(model_name).name}, {num_runs or len(dataset_paths)} SLAO runs")

    @server.tool(
        name="export_gguf",
        title="Export to GGUF (llama.cpp / Ollama)",
        annotations=hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def export_gguf(
        job_id: Annotated[
            str | None,
            name_arg("a succeeded fine-tune or series job to export"),
        ] = None,
        adapter_path: Annotated[str | None, path_arg("or: a LoRA adapter folder")] = None,
        base_model: Annotated[
            str | None,
            path_arg("base model; default: the one the job trained"),
        ] = None,
        quantizations: Annotated[list[ExportQuant], Field(min_length=1)] = ["q4_k_m"],  # noqa: B006 - pydantic copies it
        adapter_gguf: Annotated[bool, setting("adapter_gguf", ExportSpec)] = False,
        verify: Annotated[bool, setting("verify", ExportSpec)] = True,
        register_ollama: Annotated[bool, setting("register_ollama", ExportSpec)] = False,
        ollama_name: Annotated[
            str | None,
            name_arg("model name in Ollama, e.g. 'my-assistant'"),
        ] = None,
        system_prompt: Annotated[str | None, Field(max_length=MAX_SYSTEM_CHARS)] = None,
        output_dir: Annotated[
            str | None,
            path_arg("absolute folder for the GGUF files and Modelfile (default: the job's)"),
        ] = None,
        *,
        roots: ClientRoots,
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
        if register_ollama and not ollama_name:
            raise ToolError("register_ollama=true needs ollama_name (the name to give the model in Ollama).")
        spec = checks.validated(
            ExportSpec,
            "export settings",
            source=source,
            base_model=checks.check_model(base_model) if base_model else None,
            quantizations=quantizations,
            adapter_gguf=adapter_gguf,
            verify=verify,
            register_ollama=register_ollama,
            ollama_name=ollama_name,
            system_prompt=system_prompt,
            output_dir=str(resolve_writable_dir(output_dir, "output_dir")) if output_dir else None,
        )
        return create(spec, f"GGUF {','.join(spec.quantizations)} of {label}")
