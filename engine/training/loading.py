"""Everything a recipe decides before the model loads: device, dataset, tokens, settings."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import torch

from engine.contract.datasets import DatasetError
from engine.contract.events import EventWriter
from engine.contract.spec import DatasetSettings
from engine.data.formats import Example, load_examples, split_for_eval
from engine.data.methods import examples_for_method, format_problem
from engine.data.tokenizing import Tokenized, tokenize_all
from engine.models.adapters import trained_rank
from engine.models.presets import model_shape
from engine.planning.defaults import ResolvedTraining, resolve_training
from engine.training.base_model import load_tokenizer
from engine.training.loss import compile_ahead
from engine.training.ranks import active_rank

# Benchmarks (benchmarks/train_speed.py) simulate a smaller card: this share of its memory, at most.
MEMORY_FRACTION_ENV = "BACKPROP_CUDA_MEMORY_FRACTION"


def pick_device(choice: str, gpu_index: int = 0) -> str:
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda:{gpu_index}"
    if choice == "cuda":
        raise RuntimeError(
            "device 'cuda' was asked for but torch sees no CUDA GPU; use device 'auto' or 'cpu'"
        )
    return "cpu"


def job_device(choice: str, gpu_index: int = 0) -> str:
    """The device a training job runs on (``pick_device``). On a GPU its CUDA context, which takes a good
    part of a second to create, is started on a thread at once: it is made while the job reads and
    tokenizes its data (the tokenizer's work runs outside the GIL) instead of after."""
    device = pick_device(choice, gpu_index)
    if device.startswith("cuda"):
        threading.Thread(target=_make_context, args=(device,), name="cuda-context", daemon=True).start()
    return device


def _make_context(device: str) -> None:
    # an error here is the job's too: it meets it, with its own message, where it next uses the card
    with contextlib.suppress(Exception):
        torch.zeros(1, device=device)


def load_with_held_out(spec: Any, events: EventWriter) -> tuple[list[Example], list[Example]]:
    """A fine-tune's examples (``load_dataset_logged``) and the eval split it holds out, both logged."""
    events.stage("loading_data")
    examples = load_dataset_logged(spec.dataset, events, spec.method)
    examples, held_out = split_for_eval(examples, spec.dataset.eval_fraction, seed=spec.train.seed)
    if held_out:
        events.log(f"held out {len(held_out)} examples for evaluation", eval_examples=len(held_out))
    return examples, held_out


def load_dataset_logged(settings: DatasetSettings, events: EventWriter, method: str = "sft") -> list[Example]:
    """Load and validate a dataset, recording its format, size and any skipped rows as events; the examples
    ``method`` trains on (engine.data.methods: a preference file's chosen answers for sft, unpaired for kto)."""
    examples, report = load_examples(settings)
    events.log(
        f"dataset {report.path}: format {report.format}, {report.rows_ok} rows",
        format=report.format,
        rows=report.rows_ok,
        skipped=report.skipped,
    )
    if report.skipped:
        events.warning(
            f"{report.path}: skipped {report.skipped} bad rows (skip_bad_rows is on)", skipped=report.skipped
        )
    if problem := format_problem(method, report.format):
        raise DatasetError(f"{report.path}: {problem}", report)
    examples, note = examples_for_method(examples, method)
    if note:
        events.log(note, method=method, examples=len(examples))
    return examples


def free_memory_gib(device: str) -> float | None:
    """The device's free memory for the defaults (None off a GPU): the smallest of every rank's, under the
    benchmarks' cap (``MEMORY_FRACTION_ENV``)."""
    if not device.startswith("cuda"):
        return None
    free_b, total_b = torch.cuda.mem_get_info(torch.device(device))
    if cap := float(os.environ.get(MEMORY_FRACTION_ENV) or 0):  # a smaller card, for benchmarks
        torch.cuda.set_per_process_memory_fraction(cap, torch.device(device))
        free_b = min(free_b, int(cap * total_b))
    rank = active_rank()  # every rank must resolve the same settings (the same step plan)
    return rank.smallest(free_b / 1024**3) if rank is not None else free_b / 1024**3


def log_reasons(resolved: Any, events: EventWriter, decided: dict[str, Any] | None = None) -> None:
    """One log line per decided setting, with its reason (``decided``: values kept beside ``resolved``)."""
    for name, reason in resolved.reasons.items():
        value = (decided or {}).get(name, getattr(resolved, name, None))
        events.log(f"{name} = {value}: {reason}", setting=name, value=value)


def prepare_training(
    spec: Any, examples: list[Example], device: str, events: EventWriter
) -> tuple[Any, Tokenized, ResolvedTraining]:
    """Tokenizer, tokenized data and resolved settings — everything decided before the model loads."""
    events.stage("tokenizing")
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code)
    compile_ahead(device, shape.vocab_size)  # the loss kernel, on a thread while this tokenizes and loads
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    full = tokenize_all(examples, tokenizer, None)
    free_gib = free_memory_gib(device)
    rank = active_rank()
    resolved = resolve_training(
        spec.train,
        n_examples=len(full.input_ids),
        token_lengths=full.lengths,
        shape=shape,
        quantization=spec.quantization,
        lora_rank=trained_rank(getattr(spec, "init_adapter", None), spec.lora.rank),
        device=device,
        free_memory_gib=free_gib,
        lora_targets=spec.lora.target_modules,
        context_in_use=free_gib is not None,  # mem_get_info made this process's CUDA context
        shards=rank.world if rank is not None and rank.sharded else 1,
    )
    log_reasons(resolved, events)
    data = full.cut_to(resolved.max_seq_length)
    if data.dropped:
        events.warning(
            f"{data.dropped} examples had no trainable tokens within max_seq_length={resolved.max_seq_length} "
            "and were left out",
            dropped=data.dropped,
        )
    if not data.input_ids:
        raise ValueError(
            "no example has any token to learn from (all were empty or cut off by max_seq_length); "
            "raise max_seq_length or check the dataset"
        )
    return tokenizer, data, resolved
