"""Sampling a step's completions with the model being trained (no second model, no inference server).

Each prompt is sampled ``num_generations`` times, the copies of one prompt side by side (a group),
``batch`` completions at a time, left-padded, with transformers' ``generate`` and its KV cache, in eval
mode (no recomputation, no dropout) and without gradients. The sampling settings are the job's alone
(a model's own generation_config.json, e.g. Qwen's top_k 20 and repetition penalty, does not apply), as
in trl's GRPOTrainer. A completion ends at its first end-of-sequence token, which it keeps; one that
reaches ``max_new_tokens`` first is truncated.

A CUDA out-of-memory error while generating halves the generation batch and tries that batch again
(the KV cache of ``batch`` completions is the step's largest transient); only one completion at a time
failing is an error. Another engine (vLLM, a server) can take this module's place: it returns token ids.
With ``grpo_sampling_graphs`` a chunk goes through engine.training.graph_sampling (a static KV cache and a
CUDA graph of one decode step) instead of ``generate``; where that cannot run, the job says why and
goes on with ``generate``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from engine.training import graph_sampling
from engine.training.halving_batches import in_halving_batches


@dataclass
class Sampling:
    num_generations: int
    max_new_tokens: int
    temperature: float
    top_p: float
    graphs: bool = False  # grpo_sampling_graphs: engine.training.graph_sampling instead of ``generate``


@dataclass
class Generated:
    completion_ids: list[list[int]]  # num_generations per prompt, in prompt order; each ends at its first EOS
    truncated: list[bool]  # reached max_new_tokens without an EOS
    batch: int  # the generation batch it ended with (lower after an out-of-memory back-off)


def end_of_sequence_ids(tokenizer: Any, model: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation config's."""
    ids: list[int] = []
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def _cut(ids: list[int], eos: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1], False
    return ids, True


@dataclass
class _Decoding:
    """What every chunk of a step's sampling shares."""

    model: Any
    sampling: Sampling
    pad_id: int
    eos: list[int]
    device: str
    dtype: Any
    on_fallback: Callable[[str], None]

    def chunk(self, prompts: list[list[int]]) -> list[list[int]]:
        """One chunk through the graphed sampler where the job asks for it and it can run, else ``generate``;
        a graphed sampler that fails (not for memory) hands this chunk and the rest of the job to ``generate``."""
        sampling = self.sampling
        why = graph_sampling.usable(self.model) if sampling.graphs else None
        if sampling.graphs and why is None:
            try:
                return graph_sampling.sample_chunk(
                    self.model, prompts, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_p=sampling.top_p, pad_id=self.pad_id, eos_ids=self.eos, device=self.device, dtype=self.dtype,
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a capture or a transformers version it does not know
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
        if sampling.graphs:
            sampling.graphs = False
            self.on_fallback(str(why))
        return self.generate(prompts)

    def generate(self, prompts: list[list[int]]) -> list[list[int]]:
        from transformers import GenerationConfig

        ids, mask = graph_sampling.left_padded(prompts, self.pad_id)
        config = GenerationConfig(
            do_sample=True, temperature=self.sampling.temperature, top_p=self.sampling.top_p, top_k=0,
            max_new_tokens=self.sampling.max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos,
            use_cache=True,
        )  # fmt: skip
        autocast = (
            torch.autocast(self.device.split(":")[0], dtype=self.dtype)
            if self.dtype is not None
            else nullcontext()
        )
        with autocast:
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.long().to(self.device),
                generation_config=config,
            )
        return out[:, ids.shape[1] :].tolist()


def generate_completions(
    model: Any,
    prompt_ids: list[list[int]],
    sampling: Sampling,
    *,
    batch: int,
    pad_id: int,
    eos_ids: list[int],
    device: str,
    autocast_dtype: Any = None,
    on_back_off: Callable[[int], None] = lambda batch: None,
    on_fallback: Callable[[str], None] = lambda why: None,
) -> Generated:
    """``sampling.num_generations`` completions of each prompt, ``batch`` at a time (see the module)."""
    wanted = [p for p in prompt_ids for _ in range(sampling.num_generations)]
    decoding = _Decoding(model, sampling, pad_id, eos_ids, device, autocast_dtype, on_fallback)
    raw: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch = in_halving_batches(
                len(wanted), batch, lambda start, stop: raw.extend(decoding.chunk(wanted[start:stop])),
                one_fails=f"CUDA out of memory generating one completion of up to {sampling.max_new_tokens} "
                "tokens: lower grpo_max_completion_length, use quantization '4bit', or a smaller model",
                on_back_off=on_back_off,
            )  # fmt: skip
    finally:
        model.train(was_training)
    eos = set(eos_ids)
    cut = [_cut(ids, eos) for ids in raw]
    completions = [ids if ids else [pad_id] for ids, _ in cut]  # (a completion has at least one token)
    return Generated(completions, [t for _, t in cut], batch)
