"""GRPO's maths, as trl's GRPOTrainer computes it: advantages from grouped rewards, and the loss.

``advantages`` is ``_generate_and_score_completions``' ``sum_then_normalize`` branch; ``policy_loss``
is ``_compute_loss`` for token-level importance sampling with one policy update per generation (the
engine generates a step's completions with the model it is about to update, so trl's
``old_per_token_logps`` is the current ``per_token_logps`` detached and clipping never binds, as in
trl at ``num_iterations=1``). tests/test_grpo_maths.py checks both against trl on the same batch.

Where trl normalises by quantities of the whole step (dapo: the step's completion tokens; grpo and
dr_grpo: its completions), the engine passes them in, so the loss of a step does not depend on how it
is cut into micro-batches and OOM back-off changes nothing but memory; bnpo, as in trl, normalises
each micro-batch by its own tokens.

The per-token log-probabilities come from the decoder's hidden states at the completion positions,
through the output head one chunk at a time (engine.training.token_logps, as the preference losses take
theirs; with the logits divided by the sampling temperature, as trl does): no [tokens, vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.planning.grpo import LOGPS_CHUNK_BYTES
from engine.training.loss import causal_lm, supports_hidden_state_loss
from engine.training.token_logps import token_logps

EPSILON = 0.2  # trl's clipping range (GRPOConfig.epsilon): inert at one update per generation
STD_EPS = 1e-4  # trl: advantages / (std + 1e-4)


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (NaN for fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std.squeeze(dim) if dim is not None else std.reshape(())


@dataclass
class Advantages:
    advantages: torch.Tensor  # [completions]
    rewards: torch.Tensor  # [completions] weighted sums; NaN where no reward applied
    std_is_zero: torch.Tensor  # [completions] bool: the group's (or batch's) rewards were all equal


def advantages(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int, scale_rewards: str
) -> Advantages:
    """Group-relative advantages of ``rewards_per_func`` [completions, functions] (NaN: not applied);
    completions come in groups of ``num_generations`` consecutive ones per prompt."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # "group", and "none" (whose spread only feeds the zero-spread figure)
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations, dim=0)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    zero = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(adv, nan=0.0), rewards, zero)


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # this micro-batch's share of the step's loss (backward on it)
    kl_sum: torch.Tensor | None  # summed per-token KL over the micro-batch's completion tokens


def policy_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    adv: torch.Tensor,
    ref_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str,
    step_tokens: int,
    step_completions: int,
    max_completion_length: int,
    micro_completions: int | None = None,
) -> PolicyLoss:
    """trl's GRPO loss of one micro-batch: ``logps``/``mask``/``ref_logps`` [rows, completion tokens],
    ``adv`` [rows]; ``step_tokens``/``step_completions``: the whole optimizer step's; ``micro_completions``:
    the micro-batch's completions, counting those left out of it (bnpo's share; default: its rows)."""
    mask = mask.to(logps.dtype)
    coef_1 = torch.exp(logps - logps.detach())
    coef_2 = torch.clamp(coef_1, 1 - EPSILON, 1 + EPSILON)
    a = adv.unsqueeze(1)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    kl_sum = None
    if beta != 0.0:
        assert ref_logps is not None
        diff = ref_logps - logps
        kl = (torch.exp(diff) - diff - 1) * coef_1  # trl's use_bias_correction_kl (its default)
        per_token = per_token + beta * kl
        kl_sum = (kl * mask).sum().detach()
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / step_completions
    elif loss_type == "bnpo":
        # trl: this micro-batch's token mean / accumulation steps
        rows_share = (micro_completions or logps.shape[0]) / step_completions
        loss = masked.sum() / mask.sum().clamp(min=1.0) * rows_share
    elif loss_type == "dr_grpo":
        loss = masked.sum() / (step_completions * max_completion_length)
    elif loss_type == "dapo":
        loss = masked.sum() / max(1, step_tokens)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}: use dapo, grpo, dr_grpo or bnpo")
    return PolicyLoss(loss, kl_sum)


def completion_logps(
    model: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    where: tuple[torch.Tensor, torch.Tensor],
    targets: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-token log-probabilities [rows, completion tokens] of ``targets`` (flat, at ``mask``'s true
    cells, row-major) predicted at positions ``where`` = (rows, columns) of ``input_ids``."""
    if supports_hidden_state_loss(model):
        lm = causal_lm(model)
        hidden = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings().weight
        flat = token_logps(hidden[where], head, targets, temperature, chunk_bytes=LOGPS_CHUNK_BYTES)
    else:  # scaled or soft-capped logits: the model's own head, whole
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[where]
        flat = (
            torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        )
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask, flat)
