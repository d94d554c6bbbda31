"""What a preference recipe decides before the model loads: the tokenizer, the sequences of every pair (or
judged answer), the prompt and sequence lengths from their statistics, and the training settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.contract.events import EventWriter
from engine.data.formats import Example
from engine.data.preference_tokens import PreferenceTokens, tokenize_preferences, truncated
from engine.models.adapters import trained_rank
from engine.models.presets import model_shape
from engine.planning.defaults import ResolvedTraining
from engine.planning.preference import resolve_preference, sequence_lengths
from engine.training.base_model import load_tokenizer
from engine.training.loading import free_memory_gib, log_reasons
from engine.training.loss import compile_ahead


@dataclass
class PreparedPreference:
    tokenizer: Any
    train: PreferenceTokens
    held_out: PreferenceTokens | None
    resolved: ResolvedTraining
    max_prompt_length: int


def prepare_preference(
    spec: Any, examples: list[Example], held_out: list[Example], device: str, events: EventWriter
) -> PreparedPreference:
    """Tokenized training and held-out units and the resolved settings, each decision logged with its reason."""
    events.stage("tokenizing")
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code)
    compile_ahead(device, shape.vocab_size)  # the output head's kernel, on a thread while this tokenizes
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    whole = tokenize_preferences(examples, tokenizer)
    seq, prompt, reasons = sequence_lengths(
        whole.prompt_token_lengths(), whole.sequence_lengths(), whole.completion_lengths(),
        max_seq_length=spec.train.max_seq_length, max_prompt_length=spec.preference.max_prompt_length,
        max_context=shape.max_context,
    )  # fmt: skip
    data = truncated(whole, prompt, seq)
    if not data.units:
        raise ValueError(
            f"no {'pair' if whole.paired else 'example'} keeps an answer token within max_prompt_length={prompt} "
            f"and max_seq_length={seq}: raise max_seq_length or lower max_prompt_length"
        )
    rank = trained_rank(spec.init_adapter, spec.lora.rank)  # the memory estimate counts the rank trained
    free = free_memory_gib(device)
    resolved = resolve_preference(
        spec.train, spec.method, units=len(data.units), max_seq_length=seq, truncated_sequences=data.truncated,
        shape=shape, quantization=spec.quantization, lora_rank=rank, device=device, free_memory_gib=free,
        lora_targets=spec.lora.target_modules, context_in_use=free is not None,
    )  # fmt: skip
    resolved.reasons.update(reasons)
    log_reasons(resolved, events, {"max_prompt_length": prompt})
    if data.dropped:
        events.warning(
            f"{data.dropped} {'pairs' if data.paired else 'examples'} had no answer token within "
            f"max_prompt_length={prompt} and max_seq_length={seq} and were left out",
            dropped=data.dropped,
        )
    held = truncated(tokenize_preferences(held_out, tokenizer), prompt, seq) if held_out else None
    return PreparedPreference(tokenizer, data, held if held and held.units else None, resolved, prompt)
