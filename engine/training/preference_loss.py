"""The preference losses, as trl computes them (DPOTrainer, KTOTrainer, trl.experimental.orpo.ORPOTrainer),
on per-sequence log-probabilities: tensor maths only, the same on every device.

Each function returns one loss per unit (a pair, or a judged answer) and the figures trl logs, as sums
over the units (the step adds them up over its micro-batches and divides once, so the step's figures do
not depend on how it is cut into micro-batches). ``tests/test_preference_maths.py`` checks every loss and
figure against trl's own trainers on the same batch and policy, in fp32, to 1e-5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Pairs:
    """Per pair: the policy's and the reference's summed log-probabilities of each answer, and each
    answer's token count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def dpo_losses(p: Pairs, loss_type: str, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """trl's DPO loss of each pair (``DPOTrainer._compute_loss``, reverse-KL f-divergence, one loss type)."""
    chosen_ratio, rejected_ratio = p.chosen - p.ref_chosen, p.rejected - p.ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type in ("ipo", "sigmoid_norm"):  # per answer token, so the loss does not grow with length
        norm = chosen_ratio / p.chosen_tokens.clamp(min=1.0) - rejected_ratio / p.rejected_tokens.clamp(
            min=1.0
        )
        return (norm - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * norm)
    if loss_type == "exo_pair":
        eps = torch.tensor(label_smoothing, device=delta.device)
        return torch.sigmoid(beta * delta) * (F.logsigmoid(beta * delta) - torch.log1p(-eps)) + torch.sigmoid(
            -beta * delta
        ) * (F.logsigmoid(-beta * delta) - torch.log(eps))
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(beta * chosen_ratio)
            - 0.5 * F.logsigmoid(-beta * chosen_ratio)
            - 0.5 * F.logsigmoid(-beta * rejected_ratio)
        )
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * delta)
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def dpo_figures(p: Pairs, beta: float) -> dict[str, torch.Tensor]:
    """trl's DPO figures, summed over the pairs (divide by the pairs for trl's means)."""
    chosen_rewards = beta * (p.chosen - p.ref_chosen).detach()
    rejected_rewards = beta * (p.rejected - p.ref_rejected).detach()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": p.chosen.detach().sum(),
        "logps/rejected": p.rejected.detach().sum(),
    }


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """trl's KTO loss of each judged answer (``KTOTrainer._compute_loss``); ``kl`` is the batch's reference
    point (detached, clamped at 0), ``desirable`` a boolean per answer."""
    ratio = logps - ref_logps
    if loss_type == "kto":  # Eq. (7) of the KTO paper
        good = 1 - torch.sigmoid(beta * (ratio - kl))
        bad = 1 - torch.sigmoid(beta * (kl - ratio))
    elif loss_type == "apo_zero_unpaired":
        good = 1 - torch.sigmoid(beta * ratio)
        bad = torch.sigmoid(beta * ratio)
    else:
        raise ValueError(f"unknown KTO loss type {loss_type!r}")
    return torch.where(desirable, desirable_weight * good, undesirable_weight * bad)


def kto_figures(
    logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    """trl's KTO figures as sums; ``rewards/chosen`` and ``logps/chosen`` over desirable answers (count:
    ``count/chosen``), the rejected ones over undesirable answers, and ``rewards/accuracies`` (trl logs none
    for KTO): the share of answers on their label's side of the loss's reference point (desirable ones above
    it: log-ratio > z0, undesirable ones below)."""
    ratio = (logps - ref_logps).detach()
    rewards = beta * ratio
    good, bad = desirable.float(), (~desirable).float()
    return {
        "rewards/chosen": (rewards * good).sum(),
        "rewards/rejected": (rewards * bad).sum(),
        "logps/chosen": (logps.detach() * good).sum(),
        "logps/rejected": (logps.detach() * bad).sum(),
        "rewards/accuracies": torch.where(desirable, ratio > kl, ratio < kl).float().sum(),
        "count/chosen": good.sum(),
        "count/rejected": bad.sum(),
    }


def kl_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the mean log-ratio of mismatched (prompt, answer) pairs, detached and at least 0."""
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as trl's ORPO computes it)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO's per pair (log sigmoid of the log odds ratio, the log odds ratio) from the answers' mean
    per-token log-probabilities (``ORPOTrainer.odds_ratio_loss``); the loss subtracts beta times the first."""
    c, r = chosen_mean.float(), rejected_mean.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return F.logsigmoid(log_odds), log_odds


def orpo_figures(
    chosen_mean: torch.Tensor,
    rejected_mean: torch.Tensor,
    ratio: torch.Tensor,
    log_odds: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """trl's ORPO figures as sums over the pairs (``nll_loss`` is the step's own, added by the caller)."""
    chosen_rewards, rejected_rewards = beta * chosen_mean.detach(), beta * rejected_mean.detach()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": chosen_mean.detach().sum(),
        "logps/rejected": rejected_mean.detach().sum(),
        "log_odds_ratio": ratio.detach().sum(),
        "log_odds_chosen": log_odds.detach().sum(),
    }
