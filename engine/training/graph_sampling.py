"""Sampling completions with a CUDA graph of one decode step (GRPO's ``grpo_sampling_graphs``).

Why: sampling with transformers' ``generate`` is bound by the host. On an H100 a GRPO step of a 0.5B
model spent 25 of its 28 s sampling 32 completions of 256 tokens, ~99 ms a token, while the GPU work of
one decode step is well under a millisecond (benchmarks/RESULTS.md). transformers compiles decoding only
for quantizers it marks compileable, which bitsandbytes' 4-bit one is not.

How: the prompts are left-padded into one batch and run once (prefill) into a static KV cache as long as
the prompt plus the completion; then each new token is one forward of the same shapes: its token, its
position, its slot in the cache and a prepared [batch, 1, 1, cache] attention mask, all in tensors that
stay where they are. On a CUDA device that forward is captured once per call (after one eager step that
warms what capture must not do) and replayed for every later token; elsewhere it runs eagerly, the same
maths (the tests compare it with ``generate``). Choosing the token (temperature, top-p, multinomial) and
the end-of-sequence bookkeeping run eagerly between replays, on the device, without a host sync except
every ``SYNC_EVERY`` tokens to stop once every completion has ended.

What a replay reads where it was captured: the LoRA weights and their fused layers' cast copies (fixed
for the call: the optimizer steps between calls, and each call captures anew), the cache and the inputs.
Attention is SDPA with the prepared mask, so the model must run on ``sdpa`` (``usable`` says why not).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

SYNC_EVERY = 16  # tokens between checks that every completion has ended (each check is a host sync)


def usable(model: Any) -> str | None:
    """Why this model cannot sample this way, or None when it can."""
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no config"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention is {getattr(config, '_attn_implementation', None)!r}, not 'sdpa'"
    return None


def sample_chunk(
    model: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    pad_id: int,
    eos_ids: list[int],
    device: str,
    dtype: Any,
) -> list[list[int]]:
    """Up to ``max_new_tokens`` sampled tokens after each prompt (padded with ``pad_id`` after an end of
    sequence, as ``generate`` pads), under ``torch.no_grad`` and the model's eval mode (the caller's)."""
    from transformers import StaticCache

    ids, prompt_mask = left_padded(prompts, pad_id)
    rows, width = ids.shape
    total = width + max_new_tokens
    valid = torch.zeros((rows, total), dtype=torch.bool)
    valid[:, :width] = prompt_mask
    ids, valid = ids.to(device), valid.to(device)
    cache = {_cache_keyword(model): StaticCache(config=model.config, max_cache_len=total)}
    positions = (valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
    # causal over the prompt's real tokens; a padding position sees itself only (a row that sees nothing
    # would turn to NaN in SDPA, and its keys and values with it)
    causal = torch.ones((width, total), dtype=torch.bool, device=device).tril()
    own = torch.eye(width, total, dtype=torch.bool, device=device)
    attend = (causal[None] & valid[:, None, :]) | own[None]
    # capture cannot use the default stream: the whole call runs on one of its own
    with _own_stream(device):
        with _autocast(device, dtype):
            out = model(
                input_ids=ids, attention_mask=attend[:, None], position_ids=positions, use_cache=True,
                cache_position=torch.arange(width, device=device), logits_to_keep=1, **cache,
            )  # fmt: skip
        step = _DecodeStep(model, cache, valid, positions[:, -1:] + 1, width, device, dtype)
        token = _choose(out.logits[:, -1], temperature, top_p)
        eos = torch.tensor(eos_ids or [-1], device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
        for t in range(max_new_tokens):
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens[:, t] = token
            done |= torch.isin(token, eos)
            if t + 1 == max_new_tokens or ((t + 1) % SYNC_EVERY == 0 and bool(done.all())):
                break
            token = _choose(step(token, t), temperature, top_p)
        return tokens.tolist()  # (the sync that ends the call)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one batch, right-aligned: token ids [rows, longest] and where they are real (bool)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    real = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        real[i, width - len(p) :] = True
    return ids, real


def _cache_keyword(model: Any) -> str:
    """transformers 5.2x names the cache argument ``cache`` (``past_key_values`` warns each call)."""
    from engine.training.loss import causal_lm

    forward = inspect.signature(causal_lm(model).model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _choose(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row from ``logits`` [rows, vocab], as ``generate`` samples with top_k 0."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # keep the smallest set of tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(-1)


@contextlib.contextmanager
def _own_stream(device: str) -> Iterator[None]:
    if not device.startswith("cuda"):
        yield
        return
    caller = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        yield
    caller.wait_stream(stream)


@contextlib.contextmanager
def _autocast(device: str, dtype: Any) -> Iterator[None]:
    if dtype is None:
        yield
        return
    # no cast cache: inside a CUDA graph it would hold casts made at capture (torch's advice for graphs)
    with torch.autocast(device.split(":")[0], dtype=dtype, cache_enabled=False):
        yield


class _DecodeStep:
    """One decode forward with fixed tensors: eager, or captured once and replayed (CUDA)."""

    def __init__(
        self,
        model: Any,
        cache: dict[str, Any],
        valid: torch.Tensor,
        next_pos: torch.Tensor,
        width: int,
        device: str,
        dtype: Any,
    ):
        self.model, self.cache, self.device, self.dtype, self.width = model, cache, device, dtype, width
        self.valid = valid  # [rows, total]: the keys each row attends to (its prompt, then every new slot)
        self.token = torch.zeros((valid.shape[0], 1), dtype=torch.long, device=device)
        self.start = next_pos  # [rows, 1]: the first completion token's position
        self.position = next_pos.clone()
        self.slot = torch.full((1,), width, dtype=torch.long, device=device)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None

    def __call__(self, token: torch.Tensor, t: int) -> torch.Tensor:
        """The next token's logits [rows, vocab] after ``token`` (the completion's ``t``-th)."""
        self.token.copy_(token[:, None])
        self.position.copy_(self.start + t)
        self.slot.fill_(self.width + t)
        self.valid[:, self.width + t] = True
        if self.graph is not None:
            self.graph.replay()
            assert self.logits is not None
            return self.logits
        logits = self._eager()
        if self.device.startswith("cuda") and t == 0:  # captured after one eager step (its warm-up)
            self._capture()
        return logits

    def _eager(self) -> torch.Tensor:
        with _autocast(self.device, self.dtype):
            out = self.model(
                input_ids=self.token, attention_mask=self.valid[:, None, None, :], position_ids=self.position,
                cache_position=self.slot, use_cache=True, **self.cache,
            )  # fmt: skip
        return out.logits[:, -1]

    def _capture(self) -> None:
        """Record the decode forward on the call's own stream (``_own_stream``); the next steps replay it.
        Capture runs nothing: the eager step before it has done this step's work."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.current_stream(self.device)):
            self.logits = self._eager()
        self.graph = graph
