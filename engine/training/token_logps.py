"""Each target token's log-probability from the decoder's hidden states, in chunks (no full logits), and
their sums per sequence: what the preference losses (DPO, KTO, ORPO) are made of.

The same chunking as the next-token loss (engine.training.loss): only the positions that carry a target
are projected through the output head, one chunk of logits at a time. With a frozen head (LoRA) each
chunk's gradient with respect to the hidden states is computed in the forward pass while its logits are
at hand (one-hot minus softmax, times the head; the next-token loss's kernel) and kept as one
[tokens, hidden] tensor; the backward pass scales each row by its token's incoming gradient
(``TokenLogProbs``). A preference loss weighs each sequence differently, so the gradient arrives per
token, where the next-token loss has one scale.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.planning.memory import CHUNKED_LOSS_BYTES, loss_chunk_tokens
from engine.training.batching import DeviceBatch
from engine.training.loss import causal_lm, cross_entropy_rows, supports_hidden_state_loss


def chunk_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target) of each row of ``hidden`` through ``weight`` (fp32), the logits divided by ``temperature``.
    Without gradients: one fp32 copy of the chunk's logits (the 16-bit ones go once copied) and logsumexp's."""
    logits = F.linear(hidden, weight).float()
    if temperature != 1.0:
        logits.div_(temperature)  # its own copy (or F.linear's fp32 output), which no backward reads
    return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)


class TokenLogProbs(torch.autograd.Function):
    """log p(target) of each row of ``hidden`` [n, h] through a frozen head ``weight`` [vocab, h] (the logits
    divided by ``temperature``: GRPO's sampling temperature), in chunks of ``chunk`` rows; the gradient
    w.r.t. ``hidden`` is computed in the forward pass, ``weight`` gets none. log p(target) is minus the
    cross-entropy: each chunk goes through the next-token loss's kernel (compiled on a GPU), so its working
    set is its 16-bit logits and their gradient, nothing in fp32."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        temperature: float,
    ) -> torch.Tensor:
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)  # of the cross-entropy: minus log p's
        every_row = torch.ones(min(chunk, hidden.shape[0]), 1, dtype=torch.bool, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk].unsqueeze(1)
            losses, grad_logits = cross_entropy_rows(
                F.linear(h, weight), t, every_row[: h.shape[0]], temperature
            )
            torch.neg(losses, out=out[start : start + chunk])
            grad_hidden[start : start + chunk] = grad_logits.to(weight.dtype) @ weight
            del grad_logits  # else it shares the next chunk's peak with that chunk's logits and gradient
        ctx.save_for_backward(grad_hidden)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.neg().unsqueeze(1).to(grad_hidden.dtype), None, None, None, None


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_bytes: int = CHUNKED_LOSS_BYTES,
) -> torch.Tensor:
    """log p(target) for each row of ``hidden`` [n, h] (fp32 [n]), the logits divided by ``temperature``,
    one chunk of logits (``chunk_bytes`` of them in fp32) at a time."""
    # the memory estimate counts default-sized chunks (GRPO's smaller ones too: it errs on the safe side)
    chunk = loss_chunk_tokens(weight.shape[0], chunk_bytes)
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return TokenLogProbs.apply(hidden, weight, targets, chunk, temperature)
    parts = []
    for start in range(0, targets.numel(), chunk):
        hc, tc = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():  # a trained head: each chunk's logits recomputed in the backward pass
            parts.append(
                checkpoint(
                    chunk_logps, hc, weight, tc, temperature, use_reentrant=False, preserve_rng_state=False
                )
            )
        else:
            parts.append(chunk_logps(hc, weight, tc, temperature))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def position_logps(model: Any, b: DeviceBatch) -> torch.Tensor:
    """log p(target) at each of ``b``'s gathered positions (``b.gather_index``), fp32."""
    targets = b.gather_targets.clamp_min(0)
    if not supports_hidden_state_loss(model):  # soft-capped or scaled logits: the model's own head
        out = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **b.attn_kwargs)
        flat = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, b.gather_index).float()
        return flat.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    lm = causal_lm(model)
    out = lm.model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **b.attn_kwargs)
    hidden = out.last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b.gather_index)
    logps = token_logps(h, lm.get_output_embeddings().weight, targets)
    if b.gather_index.numel() == 0:
        return logps + hidden.sum() * 0.0  # keeps the graph connected for an all-masked micro-batch
    return logps


def sequence_sums(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``values`` [n] added up per row (``rows`` [n]: each value's row): [n_rows]."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)
