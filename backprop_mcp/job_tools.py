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
from pydantic import BaseModel, Field, ValidationError

from backprop_mcp import checks, extras
from backprop_mcp.app import LINKED_TOOL_META
from backprop_mcp.limits import MAX_DATASETS, MAX_NAME_CHARS, MAX_PATH_CHARS, MAX_SYSTEM_CHARS
from backprop_mcp.models import StartedJob
from backprop_mcp.paths import resolve_readable, resolve_writable_dir
from backprop_mcp.policy import ClientRoots
from backprop_mcp.state import ServerState
from backprop_mcp.store import JobRecord
from backprop_mcp.tooling import hints, setting
from engine.interface import (
    DatasetSettings,
    ExportQuant,
    ExportSpec,
    FinetuneSpec,
    LoraSettings,
    MergeMode,
    SeriesSpec,
    TrainSettings,
    quoted,
)


def register_job_tools(
    server: MCPServer,
    state: Callable[[], ServerState],
    find_job: Callable[[str], JobRecord],
    create: Callable[[BaseModel, str, list[str]], StartedJob],
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
            Field(
                max_length=MAX_PATH_CHARS,
                description="absolute path of a JSONL/JSON/CSV/Parquet file or saved `datasets` folder "
                "(chat 'messages', 'prompt'/'completion' or 'text' rows), or a hub dataset name",
            ),
        ],
        model: Annotated[
            str,
            Field(
                max_length=MAX_PATH_CHARS,
                description="preset name (e.g. 'tiny'), local model folder, or hub name",
            ),
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
        gpus: Annotated[
            list[Annotated[int, Field(ge=0)]] | Literal["all"] | None, setting(FinetuneSpec, "gpus")
        ] = None,
        parallel: Annotated[Literal["auto", "ddp", "fsdp"], setting(FinetuneSpec, "parallel")] = "auto",
        eval_fraction: Annotated[float, setting(DatasetSettings, "eval_fraction")] = 0.0,
        skip_bad_rows: Annotated[bool, setting(DatasetSettings, "skip_bad_rows")] = False,
        packing: Annotated[bool | None, setting(TrainSettings, "packing")] = None,
        checkpoint_every: Annotated[int | None, setting(TrainSettings, "checkpoint_every")] = None,
        seed: int = 42,
        backend: Annotated[Literal["auto", "native", "unsloth"], setting(TrainSettings, "backend")] = "auto",
        *,
        roots: ClientRoots,
    ) -> StartedJob:
        """Start fine-tuning a model on a dataset as a background job and return its id at once.
        Every setting is optional: smart defaults fill them from the data and the GPU. The dataset and
        settings are checked first (missing file, malformed rows, bad values: an error, nothing created).
        Follow the job with job_status(job_id, wait_s=30)."""
        extras.require("train", "start_finetune")
        if backend == "unsloth":
            extras.require("unsloth", "start_finetune with backend 'unsloth'")
        data_path = checks.dataset_path(dataset_path)
        model_name = checks.check_model(model)
        try:
            spec = FinetuneSpec.model_validate(
                {
                    "model": model_name,
                    "quantization": quantization,
                    "device": device,
                    "gpu_index": gpu_index,
                    "gpus": gpus,
                    "parallel": parallel,
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
                            "backend": backend,
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
        name="run_slao_series",
        title="Start a multi-run SLAO series",
        annotations=hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def run_slao_series(
        dataset_paths: Annotated[
            list[Annotated[str, Field(max_length=MAX_PATH_CHARS)]],
            Field(
                min_length=1,
                max_length=MAX_DATASETS,
                description="one dataset split into num_runs slices, or one dataset per task/run",
            ),
        ],
        model: Annotated[str, Field(max_length=MAX_PATH_CHARS)] = "tiny",
        num_runs: Annotated[int | None, setting(SeriesSpec, "num_runs")] = None,
        steps_per_run: Annotated[int | None, setting(SeriesSpec, "steps_per_run")] = None,
        samples_per_run: Annotated[int | None, setting(SeriesSpec, "samples_per_run")] = None,
        merge_mode: Annotated[MergeMode, setting(SeriesSpec, "merge_mode")] = "slao",
        replay_fraction: Annotated[float, setting(SeriesSpec, "replay_fraction")] = 0.0,
        heldout_fraction: Annotated[float, setting(SeriesSpec, "heldout_fraction")] = 0.1,
        lora_rank: Annotated[int, setting(LoraSettings, "rank")] = 16,
        quantization: Literal["auto", "4bit", "16bit", "none"] = "auto",
        device: Literal["auto", "cpu", "cuda"] = "auto",
        gpus: Annotated[
            list[Annotated[int, Field(ge=0)]] | Literal["all"] | None, setting(SeriesSpec, "gpus")
        ] = None,
        parallel: Annotated[Literal["auto", "ddp", "fsdp"], setting(SeriesSpec, "parallel")] = "auto",
        learning_rate: Annotated[float | None, setting(TrainSettings, "learning_rate")] = None,
        max_seq_length: Annotated[int | None, setting(TrainSettings, "max_seq_length")] = None,
        skip_bad_rows: bool = False,
        *,
        roots: ClientRoots,
    ) -> StartedJob:
        """Start a continual-learning series as one background job: N runs over successive data slices
        (or one dataset per task), merging each run's LoRA into the accumulated adapter with SLAO so new
        data is learnt without forgetting the old, and an evaluation matrix across runs."""
        extras.require("train", "run_slao_series")
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
                    "gpus": gpus,
                    "parallel": parallel,
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
        annotations=hints(read_only=False, destructive=False, idempotent=False, open_world=True),
        meta=LINKED_TOOL_META,
    )
    def export_gguf(
        job_id: Annotated[
            str | None,
            Field(max_length=MAX_NAME_CHARS, description="a succeeded fine-tune or series job to export"),
        ] = None,
        adapter_path: Annotated[
            str | None, Field(max_length=MAX_PATH_CHARS, description="or: a LoRA adapter folder")
        ] = None,
        base_model: Annotated[
            str | None,
            Field(max_length=MAX_PATH_CHARS, description="base model; default: the one the job trained"),
        ] = None,
        quantizations: Annotated[list[ExportQuant], Field(min_length=1)] = ["q4_k_m"],  # noqa: B006 - pydantic copies it
        adapter_gguf: Annotated[bool, Field(description="also write the LoRA adapter as GGUF")] = False,
        verify: Annotated[bool, Field(description="check the GGUF's logits against the merged model")] = True,
        register_ollama: bool = False,
        ollama_name: Annotated[
            str | None,
            Field(max_length=MAX_NAME_CHARS, description="model name in Ollama, e.g. 'my-assistant'"),
        ] = None,
        system_prompt: Annotated[str | None, Field(max_length=MAX_SYSTEM_CHARS)] = None,
        output_dir: Annotated[
            str | None,
            Field(
                max_length=MAX_PATH_CHARS,
                description="absolute folder for the GGUF files and Modelfile (default: the job's)",
            ),
        ] = None,
        *,
        roots: ClientRoots,
    ) -> StartedJob:
        """Export a fine-tuned model as a background job: merge the adapter into its base model, convert
        to GGUF, quantize (q4_k_m by default), verify against the original, and optionally register the
        result with a local Ollama. Follow it with job_status."""
        extras.require("export", "export_gguf")
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
                    f"adapter_path: {quoted(folder)} has no adapter_config.json; give a PEFT adapter folder."
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
                    "output_dir": str(resolve_writable_dir(output_dir, "output_dir")) if output_dir else None,
                }
            )
        except ValidationError as exc:
            raise ToolError(
                f"invalid export settings: {checks.validation_message(exc)}. Fix them and call again."
            ) from exc
        return create(spec, f"GGUF {','.join(spec.quantizations)} of {label}", [])
