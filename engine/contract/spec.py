"""Job specifications: the contract between the server and the worker.

A job folder holds ``spec.json`` (one of the models below, validated), ``events.jsonl``
(see ``engine.contract.events``) and, at the end, ``result.json`` (``JobResult``). This module imports
only pydantic and the standard library, so the server can use it without torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from engine.contract.files import atomic_write_text
from engine.contract.grpo import COMPLETIONS_FILE, GrpoSettings, grpo_settings_problem
from engine.contract.preference import PreferenceSettings, preference_settings_problem

SPEC_FILE = "spec.json"
EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel.request"  # its presence asks the worker to checkpoint and stop
WORKER_LOG = "worker.log"  # the worker's stderr (library warnings, tracebacks)
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
# Files a job writes as it runs that are worth reading before it ends, or after it failed or was
# cancelled: artifact name -> file in the job folder. Each is listed wherever it exists.
RUNNING_ARTIFACTS = {"completions": COMPLETIONS_FILE}


def running_artifacts(job_dir: str | Path) -> dict[str, str]:
    """The files of ``RUNNING_ARTIFACTS`` the job folder holds now: name -> absolute path."""
    folder = Path(job_dir).resolve()
    return {name: str(folder / file) for name, file in RUNNING_ARTIFACTS.items() if (folder / file).is_file()}


class _Strict(BaseModel):
    # A typo in a setting must be an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2*rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' (every projection)"
    )

    @property
    def scaling(self) -> float:
        return (self.alpha if self.alpha is not None else 2.0 * self.rank) / self.rank


class DatasetSettings(_Strict):
    path: str = Field(description="JSONL/JSON/CSV/Parquet file, a saved `datasets` folder, or a hub name")
    split: str | None = Field(None, description="split for hub datasets / saved DatasetDicts")
    skip_bad_rows: bool = Field(False, description="skip malformed rows (reported) instead of refusing")
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5, description="fraction held out for evaluation")


class TrainSettings(_Strict):
    """Every field is optional: ``None`` means 'choose a smart default and report why'."""

    steps: int | None = Field(None, ge=1, description="optimizer steps; default from dataset size")
    epochs: float | None = Field(None, gt=0, description="used when steps is not given")
    learning_rate: float | None = Field(None, gt=0, lt=1, description="default: chosen for the model")
    warmup_steps: int | None = Field(None, ge=0, description="default: 4% of the steps")
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    micro_batch_size: int | None = Field(None, ge=1, le=1024, description="default: from free memory")
    gradient_accumulation: int | None = Field(
        None, ge=1, le=4096, description="default: reach the target rows per step"
    )
    max_seq_length: int | None = Field(None, ge=16, le=131072, description="default: from the data")
    packing: bool | None = Field(
        None,
        description="pack short examples into full rows (padding-free, attention kept per example); default on",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute each layer in the backward pass: far less memory, about a third more compute; "
        "default: off on a GPU whose free memory holds every layer's activations with room to spare, else on",
    )
    offload_activations: bool | None = Field(
        None,
        description="with gradient checkpointing on a GPU: keep each layer's checkpointed input in pinned host "
        "memory (copied on a side stream) instead of on the card; default: on where those inputs are large",
    )
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    checkpoint_every: int | None = Field(None, ge=1, description="save a resumable checkpoint every N steps")
    backend: Literal["auto", "native", "unsloth"] = Field(
        "auto",
        description="native: the engine's own fast path; unsloth: Unsloth's (must be installed); auto: pick",
    )
    compile: bool = Field(
        False,
        description="native fast path on a GPU: also compile each decoder layer with torch.compile (10-12 s at "
        "the start); little gain on top of CUDA graphs where Liger's kernels are in use",
    )
    cuda_graphs: bool = Field(
        True,
        description="native fast path on one GPU: replay each micro-batch's forward and backward from a CUDA "
        "graph (one per padded shape); cuts the per-kernel host cost that rules small models' steps",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="also log metrics to TensorBoard (job folder) / W&B (offline)"
    )

    @model_validator(mode="after")
    def _offload_needs_checkpointing(self) -> TrainSettings:
        if self.offload_activations and self.gradient_checkpointing is False:
            raise ValueError(
                "offload_activations=true moves gradient checkpointing's saved layer inputs to host memory, "
                "but gradient_checkpointing is false: set gradient_checkpointing=true, or drop offload_activations"
            )
        return self


class SafetySettings(_Strict):
    pause_temperature_c: float = Field(85.0, description="pause between steps above this GPU temperature")
    resume_temperature_c: float = Field(78.0, description="resume once the card has cooled to this")
    emergency_temperature_c: float = Field(92.0, description="checkpoint and stop above this")
    max_pause_s: float = Field(600.0, ge=0, description="give up (checkpoint, error) after pausing this long")

    @model_validator(mode="after")
    def _ordered(self) -> SafetySettings:
        resume, pause, emergency = (
            self.resume_temperature_c,
            self.pause_temperature_c,
            self.emergency_temperature_c,
        )
        if not resume <= pause <= emergency:
            raise ValueError(
                "GPU temperatures must satisfy resume_temperature_c <= pause_temperature_c <= "
                f"emergency_temperature_c; got {resume}, {pause}, {emergency}"
            )
        return self


Quantization = Literal["auto", "4bit", "16bit", "none"]
DeviceChoice = Literal["auto", "cpu", "cuda"]


class _ModelJob(_Strict):
    model: str = Field(
        "tiny", description="preset name (e.g. 'tiny', 'qwen2.5-7b'), local model folder, or hub name"
    )
    quantization: Quantization = Field(
        "auto",
        description="auto: 4-bit NF4 on a GPU, full precision on CPU; 16bit: bf16/fp16 LoRA; none: fp32",
    )
    keep_quantized: bool = Field(True, description="4-bit: keep the quantized base after a job (under "
        "BACKPROP_HOME/cache/nf4, a third of its 16-bit size, keyed by the weights' hash) and load it in later "
        "jobs instead of quantizing again (one GPU, no remote code)")  # fmt: skip
    device: DeviceChoice = "auto"
    gpu_index: int = Field(0, ge=0)
    gpus: list[Annotated[int, Field(ge=0)]] | Literal["all"] | None = Field(
        None,
        description="train on several GPUs at once (one rank per card, through torchrun; see parallel): card "
        "indices or 'all'; default: the one device of gpu_index. With device 'cpu' the list's length "
        "is the number of CPU ranks (gloo)",
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="with several gpus: ddp (a whole model on each card: fastest), fsdp (the base weights "
        "sharded over the cards: for a model no single card holds), auto: fsdp when it fits no card",
    )
    trust_remote_code: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)

    @model_validator(mode="after")
    def _devices(self) -> _ModelJob:
        # gpus sits beside device and gpu_index (not in train): it picks the hardware, as they do
        if isinstance(self.gpus, list):
            if not self.gpus or len(set(self.gpus)) != len(self.gpus):
                raise ValueError(
                    f"gpus={self.gpus} must list each card once, e.g. gpus=[0, 1] (or gpus='all')"
                )
            if self.gpu_index not in (0, *self.gpus[:1]) or (self.gpu_index and len(self.gpus) > 1):
                raise ValueError("give either gpu_index (one card) or gpus (several), not both")
            if len(self.gpus) == 1:  # one card is the one-device path: gpu_index names it
                self.gpu_index = self.gpus[0]
        if self.parallel == "fsdp" and self.gpus != "all" and len(self.gpus or []) < 2:
            raise ValueError("parallel='fsdp' shards the model over several cards: give gpus=[0, 1] or 'all'")
        if self.train.backend == "unsloth" and (self.gpus == "all" or len(self.gpus or []) > 1):
            raise ValueError(
                "backend 'unsloth' trains on one GPU (its open-source version); on several cards "
                "use backend 'native' or 'auto'"
            )
        return self


Method = Literal["sft", "dpo", "kto", "orpo", "grpo"]


class FinetuneSpec(_ModelJob):
    kind: Literal["finetune"] = "finetune"
    method: Method = Field(
        "sft",
        description="sft: learn the answers (supervised); dpo: prefer the chosen answer of each pair over the "
        "rejected one; kto: from answers labelled good or bad (unpaired); orpo: sft and preference in one pass, "
        "no reference model; grpo: sample completions of the dataset's prompts and learn from their rewards "
        "(grpo_rewards)",
    )
    init_adapter: str | None = Field(
        None,
        description="start from this LoRA adapter (a finished job's id or folder, or a PEFT adapter folder) "
        "instead of a fresh one; for dpo and kto (and grpo with grpo_beta > 0) its frozen copy is the reference",
    )
    dataset: DatasetSettings
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
    grpo: GrpoSettings = Field(default_factory=GrpoSettings)

    @model_validator(mode="after")
    def _grpo_settings(self) -> FinetuneSpec:
        grpo_settings_problem(self.method, self.grpo)
        return self

    @model_validator(mode="after")
    def _method_settings(self) -> FinetuneSpec:
        # values away from their defaults (a spec read back from spec.json has every field set)
        given = [
            n for n, f in PreferenceSettings.model_fields.items() if getattr(self.preference, n) != f.default
        ]
        if self.method in ("sft", "grpo") and given:
            what = "is a setting" if len(given) == 1 else "are settings"
            raise ValueError(
                f"{', '.join(given)} {what} of the preference methods (dpo, kto, orpo) but method is "
                f"'{self.method}': "
                "set method, or leave them out"
            )
        if problem := preference_settings_problem(self.method, self.preference):
            raise ValueError(problem)
        if self.method != "sft" and (self.gpus == "all" or len(self.gpus or []) > 1):
            raise ValueError(f"method '{self.method}' trains on one device: give gpu_index, not several gpus")
        return self


MergeMode = Literal["slao", "sequential", "linear", "ties", "dare"]


class SeriesSpec(_ModelJob):
    """A multi-run SLAO series: N runs over successive slices (or one dataset per task)."""

    kind: Literal["slao_series"] = "slao_series"
    datasets: list[DatasetSettings] = Field(
        min_length=1, description="one dataset split into runs, or one per task"
    )
    num_runs: int | None = Field(
        None, ge=1, le=100, description="runs when one dataset is split; default len(datasets)"
    )
    samples_per_run: int | None = Field(None, ge=1)
    steps_per_run: int | None = Field(None, ge=1)
    merge_mode: MergeMode = "slao"
    merge_weight: Literal["inv_sqrt", "inv"] = Field("inv_sqrt", description="lambda(i) = 1/sqrt(i) or 1/i")
    qr_init: bool = Field(True, description="orthogonal A initialisation (the ablation turns it off)")
    replay_fraction: float = Field(0.0, ge=0.0, le=1.0)
    heldout_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    ties_density: float = Field(0.5, gt=0.0, le=1.0)
    dare_drop: float = Field(0.5, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _runs(self) -> SeriesSpec:
        if len(self.datasets) > 1 and self.num_runs not in (None, len(self.datasets)):
            raise ValueError(
                f"num_runs={self.num_runs} but {len(self.datasets)} datasets were given; "
                "with several datasets there is one run per dataset, so leave num_runs out"
            )
        if len(self.datasets) == 1 and self.num_runs is None:
            raise ValueError("a series over one dataset needs num_runs (how many slices to train in turn)")
        return self


ExportQuant = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0"]


class ExportSpec(_Strict):
    kind: Literal["export"] = "export"
    source: str = Field(description="a finished job's folder, or an adapter folder")
    base_model: str | None = Field(None, description="base model; default: the one the source job trained")
    quantizations: list[ExportQuant] = Field(
        default_factory=lambda: list[ExportQuant](["q4_k_m"]), min_length=1
    )
    adapter_gguf: bool = Field(False, description="also write the LoRA adapter as GGUF (for Ollama ADAPTER)")
    verify: bool = Field(True, description="check the GGUF's logits against the merged model")
    register_ollama: bool = Field(False, description="register the result with Ollama (needs ollama_name)")
    ollama_name: str | None = Field(
        None, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._:/-]{0,127}$", description="the model's name in Ollama"
    )
    ollama_host: str | None = Field(None, description="default: $OLLAMA_HOST, else http://127.0.0.1:11434")
    system_prompt: str | None = Field(None, description="the Modelfile's SYSTEM prompt")
    trust_remote_code: bool = False
    output_dir: str | None = Field(
        None, description="write the GGUF files and Modelfile here, not the job's gguf/"
    )

    @field_validator("quantizations")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


JobSpec = Annotated[Union[FinetuneSpec, SeriesSpec, ExportSpec], Field(discriminator="kind")]
_JOB_SPEC: TypeAdapter[Any] = TypeAdapter(JobSpec)


def parse_spec(data: dict[str, Any] | str) -> FinetuneSpec | SeriesSpec | ExportSpec:
    """Validate a spec given as a dict or JSON text (raises pydantic.ValidationError)."""
    if isinstance(data, str):
        return _JOB_SPEC.validate_json(data)
    return _JOB_SPEC.validate_python(data)


def read_spec(job_dir: str | Path) -> FinetuneSpec | SeriesSpec | ExportSpec:
    return parse_spec((Path(job_dir) / SPEC_FILE).read_text(encoding="utf-8"))


def write_spec(job_dir: str | Path, spec: BaseModel) -> Path:
    path = Path(job_dir) / SPEC_FILE
    atomic_write_text(path, spec.model_dump_json(indent=2))
    return path


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobResult(BaseModel):
    """``result.json``: written once, atomically, when a job ends (success, failure or cancel)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["succeeded", "failed", "cancelled"]
    kind: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="name -> absolute path")
    loss_history: list[dict[str, float]] = Field(default_factory=list)
    error: dict[str, str] | None = None


def write_result(job_dir: str | Path, result: JobResult) -> Path:
    path = Path(job_dir) / RESULT_FILE
    atomic_write_text(path, result.model_dump_json(indent=2))
    return path


def read_result(job_dir: str | Path) -> JobResult | None:
    path = Path(job_dir) / RESULT_FILE
    if not path.exists():
        return None
    return JobResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
