"""One torch-free preflight, run by the server, the CLI, the Python API and the worker alike.

What one of them accepts the others accept: the model name or folder, the dataset's rows, and
whether the model can fit on the chosen GPU at all are checked here, once, before a job exists
(and again by the worker, with the same code, before it loads anything). Messages say what was
wrong and what to do, naming options the way the caller spells them (``skip_bad_rows=true`` for a
tool, ``--skip-bad-rows`` on the command line, ``skip_bad_rows=True`` in Python).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from engine.contract.datasets import DatasetError
from engine.contract.spec import DatasetSettings, ExportSpec, FinetuneSpec, SeriesSpec
from engine.data.formats import inspect_dataset
from engine.data.methods import format_problem
from engine.data.sources import is_hub_dataset
from engine.models.adapters import initial_adapter
from engine.models.presets import ModelError, get_preset, resolve_model, shape_from_config
from engine.planning.defaults import MIN_SEQ_LENGTH
from engine.planning.grpo_preflight import GrpoProblem, check_grpo
from engine.planning.memory import card_keywords, estimate_memory, largest_micro_batch

Caller = Literal["tool", "cli", "python"]
# A tool call reads at most this much of a dataset itself (JSONL parses at ~50 MB/s, and clients drop
# a call after ~60 s): a bigger file's rows are checked by the worker, before it loads the model.
MAX_TOOL_INSPECT_BYTES = 256 << 20


class PreflightError(ValueError):
    """A request that would fail: the message says what is wrong and how to fix it."""


class TokenStats(BaseModel):
    examples: int
    total: int
    min: int
    median: int
    p95: int
    max: int


class DataCheck(BaseModel):
    """What ``check-data`` finds, for the server's tool and the CLI alike."""

    report: dict[str, Any] = Field(description="engine.data.formats.DatasetReport.to_dict()")
    tokens: TokenStats | None = None  # per example; preference data: per sequence (a prompt and one answer)
    method: str | None = None  # the training method the defaults are for
    method_note: str | None = None  # what the method makes of the file (a pair unpaired for kto, ...)
    method_problem: str | None = None  # why the method cannot train on the file
    prompt_tokens: TokenStats | None = None  # preference data: per prompt
    completion_tokens: TokenStats | None = None  # preference data: per answer
    fits: bool | None = None
    fit_error: str | None = None
    defaults: dict[str, Any] | None = None
    reasons: dict[str, str] | None = None
    memory_estimate_gib: dict[str, Any] | None = None
    device: str | None = None

    @property
    def ready(self) -> bool:
        """Every row usable and the defaults fit: a fine-tune would accept the dataset as it is."""
        return (
            int(self.report.get("rows_ok") or 0) > 0
            and not self.report.get("bad_rows")
            and self.fits is not False
            and self.method_problem is None
        )


def problems(exc: ValidationError) -> list[str]:
    """pydantic's refusal of a spec, one ``where: what`` line per problem, for every caller."""
    return [
        f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    ]


def spell(setting: str, value: Any, caller: Caller) -> str:
    """How ``caller``'s user sets ``setting`` to ``value``."""
    if caller == "cli":
        flag = "--" + setting.replace("_", "-")
        if isinstance(value, str) and value.startswith("["):  # a list, as a message quotes it
            value = value.strip("[]").replace(" ", "")
        return flag if value is True else f"{flag} {value}"
    if isinstance(value, bool):
        return f"{setting}={'true' if caller == 'tool' else str(value)}"
    return f"{setting}={value!r}"


def check_model(name: str) -> str:
    """A preset, a model folder (config.json) or a hub name; refuses adapter folders, files and typos."""
    try:
        resolved = resolve_model(name, build_tiny=False)
    except ModelError as exc:
        raise PreflightError(f"model: {exc}") from None
    return str(resolved.local_path) if resolved.source == "local" else resolved.name


def check_dataset(settings: DatasetSettings, caller: Caller, method: str = "sft") -> list[str]:
    """Every row of a local dataset is valid (or ``skip_bad_rows`` is on) and in a format ``method`` trains
    on; returns notes for the user. Hub datasets are checked by the worker once downloaded.
    """
    if is_hub_dataset(settings.path):
        return [f"{settings.path} is a hub dataset: its rows are checked once the worker downloads it"]
    if caller == "tool" and _file_size(settings.path) > MAX_TOOL_INSPECT_BYTES:
        return [
            f"the dataset is over {MAX_TOOL_INSPECT_BYTES >> 20} MiB: the worker checks its rows before training"
        ]
    try:
        report = inspect_dataset(settings.path, settings.split)
    except DatasetError as exc:
        raise PreflightError(str(exc)) from None
    if report.rows_ok == 0:
        raise PreflightError(report.message(skip_option=None))
    if problem := format_problem(method, report.format):
        raise PreflightError(f"{settings.path}: {problem}")
    if report.bad_rows and not settings.skip_bad_rows:
        raise PreflightError(report.message(skip_option=spell("skip_bad_rows", True, caller)))
    return [f"{report.bad_rows} bad row(s) will be skipped"] if report.bad_rows else []


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path) if os.path.isfile(path) else 0
    except (OSError, ValueError):
        return 0


def check_fit(spec: FinetuneSpec | SeriesSpec) -> list[str]:
    """Refuse a model that cannot fit on the chosen GPU(s) even at micro-batch 1 and the shortest rows.

    Only with a GPU and a known architecture (preset or local folder); a hub model's shape needs a
    download, so the worker checks it. The sequence length the defaults will pick depends on the
    data's token lengths, which need the tokenizer: here the given ``max_seq_length`` is used, or
    the shortest the defaults can choose, so this never refuses a job the worker would accept.
    A job on several cards is checked on each, with its weights sharded when it uses FSDP.
    """
    if spec.device == "cpu":
        return []
    from engine.hardware.gpus import probe_gpus  # looked up at call time (tests replace it)

    probe = probe_gpus()
    if not probe.available:
        return ["no GPU found: training runs on the CPU (fine for the 'tiny' preset and very small models)"]
    have = [g.index for g in probe.gpus]
    several = spec.gpus == "all" or len(spec.gpus or []) > 1
    wanted = (have if spec.gpus == "all" else list(spec.gpus or [])) if several else [spec.gpu_index]
    if missing := sorted(set(wanted) - set(have)):
        option = f"gpus={spec.gpus}" if several else f"gpu_index={spec.gpu_index}"
        also = " (or say 'all')" if several else ""
        raise PreflightError(
            f"{option} names GPU(s) {missing} but this machine has {have}: use only those{also}; "
            "inspect_gpu / backprop gpu lists them."
        )
    cards = [g for g in probe.gpus if g.index in wanted]
    shape = known_shape(spec.model)
    if shape is None:
        return ["memory fit is checked by the worker once the model's configuration is downloaded"]
    shards = len(cards) if len(cards) > 1 and uses_fsdp(spec, cards, shape) else 1
    for card in cards:
        fits, need, seq = card_fit(spec, shape, card, shards)
        if not fits:
            how = f" with its weights sharded over {shards} cards (FSDP)" if shards > 1 else ""
            other = " or parallel='fsdp'" if len(cards) > 1 and shards == 1 else ""
            raise PreflightError(
                f"{spec.model} does not fit on GPU {card.index} ({card.name}){how}: LoRA training with "
                f"{card_quantization(spec)} weights and {seq}-token sequences needs about {need:.1f} GiB and "
                f"{card.memory_free_mb / 1024:.1f} GiB is free. Use 4-bit quantization{other}, a shorter "
                "max_seq_length, a smaller LoRA rank or a smaller model, or free the GPU."
            )
    if shards > 1 and spec.parallel == "auto":
        return [f"{spec.model} fits no single card: its base weights are sharded over {shards} cards (FSDP)"]
    return []


def card_quantization(spec: FinetuneSpec | SeriesSpec) -> str:
    return "4bit" if spec.quantization == "auto" else spec.quantization


def card_fit(
    spec: FinetuneSpec | SeriesSpec, shape: Any, card: Any, shards: int = 1
) -> tuple[bool, float, int]:
    """Whether ``spec`` trains on ``card`` at micro-batch 1 (weights over ``shards`` cards); GiB needed; seq."""
    quant, seq = card_quantization(spec), spec.train.max_seq_length or MIN_SEQ_LENGTH
    kwargs = card_keywords(card, shards)
    free = card.memory_free_mb / 1024
    fits = largest_micro_batch(shape, quant, spec.lora.rank, seq, free, limit=1, **kwargs) > 0
    return fits, estimate_memory(shape, quant, spec.lora.rank, 1, seq, **kwargs).total_gib, seq


def uses_fsdp(spec: FinetuneSpec | SeriesSpec, cards: list[Any], shape: Any) -> bool:
    """A job on several cards shards its base weights (FSDP) when it says parallel 'fsdp', or 'auto'
    and the model fits none of its cards whole (``cards``: their GpuInfo; none on the CPU)."""
    if spec.parallel != "auto":
        return spec.parallel == "fsdp"
    return bool(cards) and shape is not None and not all(card_fit(spec, shape, c)[0] for c in cards)


def known_shape(model: str) -> Any:
    """The architecture of a preset or a local folder, without torch; None when it needs a download."""
    preset = get_preset(model)
    if preset is not None:
        return preset.shape
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            return shape_from_config(json.loads(config.read_text(encoding="utf-8")), str(config))
        except (ValueError, KeyError, TypeError):
            return None
    return None


def preflight(spec: FinetuneSpec | SeriesSpec | ExportSpec, caller: Caller) -> list[str]:
    """Everything that can be checked before a job exists; returns notes, raises PreflightError."""
    if isinstance(spec, ExportSpec):
        if spec.base_model:
            check_model(spec.base_model)
        return []
    check_model(spec.model)
    datasets = [spec.dataset] if isinstance(spec, FinetuneSpec) else spec.datasets
    method = spec.method if isinstance(spec, FinetuneSpec) else "sft"
    notes = [note for settings in datasets for note in check_dataset(settings, caller, method)]
    if isinstance(spec, FinetuneSpec) and spec.init_adapter is not None:
        try:
            initial_adapter(spec.init_adapter)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None  # its message names init_adapter
    if isinstance(spec, FinetuneSpec) and spec.method == "grpo":
        try:
            notes += check_grpo(spec, MAX_TOOL_INSPECT_BYTES if caller == "tool" else None)
        except GrpoProblem as exc:
            raise PreflightError(str(exc)) from None
    return notes + check_fit(spec)
