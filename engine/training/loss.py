"""Causal-LM loss without materialising the full logits tensor.

The plain way (``model(...).logits`` then cross-entropy) builds a [tokens, vocab] float32 tensor:
for micro-batch 4 × 2048 tokens and Qwen2.5's 152k vocabulary that is 5 GB, the largest single
item in a QLoRA step's memory. Here the loss is computed from the decoder's hidden states, only
at positions that carry a target (the assistant tokens of a chat set are often a small part),
in chunks whose logits exist one at a time: each chunk is checkpointed, so its logits are
recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.memory import loss_chunk_tokens
from engine.training.batching import IGNORE


def chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss_sum(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose target is not IGNORE."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    keep = t != IGNORE
    h, t = h[keep], t[keep]
    if t.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph connected for an all-masked micro-batch
    chunk = loss_chunk_tokens(lm_head_weight.shape[0])  # the memory estimate assumes the same chunks
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk):
        hc, tc = h[start : start + chunk], t[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, hc, lm_head_weight, tc, use_reentrant=False)
        else:
            total = total + chunk_loss(hc, lm_head_weight, tc)
    return total


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def supports_hidden_state_loss(model: Any) -> bool:
    """True when logits are exactly lm_head(decoder(x)): no soft-capping or scaling to replicate."""
    lm = causal_lm(model)
    cfg = lm.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    head = lm.get_output_embeddings()
    return hasattr(lm, "model") and head is not None and getattr(head, "bias", None) is None


def causal_lm_loss_sum(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Summed next-token loss for one micro-batch (targets already shifted, see engine.training.batching)."""
    if supports_hidden_state_loss(model):
        lm = causal_lm(model)
        out = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return chunked_lm_loss_sum(out.last_hidden_state, lm.get_output_embeddings().weight, targets)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
