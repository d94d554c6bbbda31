"""One GRPO step's rollout: sample the completions, score them, group-normalise the rewards; its figures.

The prompts come from a job's prompt rows (engine.data.prompts); the completions reach the rewards as
trl passes them (text, or an assistant message for message prompts, with every other column of the
prompt's row by name). The figures are named as trl's GRPOTrainer logs them (reward, reward_std,
rewards/<name>/mean and /std, frac_reward_zero_std, completions/mean_length, ...), declared once in
engine.contract.grpo_figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from engine.contract import grpo_figures as figures
from engine.data.formats import Example
from engine.data.prompts import prompt_token_ids
from engine.rewards.scoring import Reward, Scores, score
from engine.training.grpo_generate import Generated
from engine.training.grpo_loss import Advantages, advantages, nanstd


@dataclass
class PromptSet:
    """A job's prompts, ready to sample from: token ids, what the rewards see, and each row's columns."""

    ids: list[list[int]]
    prompts: list[Any]  # the text, or the messages
    conversational: list[bool]
    columns: list[dict[str, Any]]

    @property
    def lengths(self) -> list[int]:  # (the loop's step plan reads these)
        return [len(i) for i in self.ids]

    @classmethod
    def build(cls, examples: list[Example], tokenizer: Any) -> PromptSet:
        ids, prompts, conversational, columns = [], [], [], []
        for ex in examples:
            ids.append(prompt_token_ids(ex.prompt, ex.messages, tokenizer))
            prompts.append(ex.messages if ex.messages is not None else ex.prompt)
            conversational.append(ex.messages is not None)
            columns.append(dict(ex.columns or {}))
        return cls(ids, prompts, conversational, columns)


@dataclass
class Rollout:
    prompt_index: list[int]  # per completion: which prompt of the set
    completion_ids: list[list[int]]
    completions: list[Any]  # as the rewards saw them
    truncated: list[bool]
    scores: Scores
    advantages: Advantages


def score_completions(
    prompts: PromptSet,
    chosen: list[int],
    generated: Generated,
    num_generations: int,
    rewards: list[Reward],
    tokenizer: Any,
    scale_rewards: str,
) -> Rollout:
    """Rewards and advantages of ``generated``: ``num_generations`` completions of each prompt in ``chosen``."""
    index = [p for p in chosen for _ in range(num_generations)]
    texts = tokenizer.batch_decode(generated.completion_ids, skip_special_tokens=True)
    completions = [
        [{"role": "assistant", "content": t}] if prompts.conversational[p] else t
        for p, t in zip(index, texts, strict=True)
    ]
    names = sorted({k for p in chosen for k in prompts.columns[p]})
    columns = {k: [prompts.columns[p].get(k) for p in index] for k in names}
    scores = score(
        rewards, [prompts.prompts[p] for p in index], completions, generated.completion_ids, columns
    )
    per_func = torch.tensor([[scores.per_function[r.label][i] for r in rewards] for i in range(len(index))])
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
    adv = advantages(per_func, weights, num_generations, scale_rewards)
    return Rollout(index, generated.completion_ids, completions, generated.truncated, scores, adv)


def rollout_metrics(rollout: Rollout, rewards: list[Reward]) -> dict[str, float]:
    """The step's reward and completion figures (engine.contract.grpo_figures' names, trl's); values
    that are not numbers are left out."""
    out: dict[str, float] = {}
    total = rollout.advantages.rewards
    out[figures.REWARD] = torch.nanmean(total).item()
    out[figures.REWARD_STD] = nanstd(total).item()
    for r in rewards:
        values = torch.tensor(rollout.scores.per_function[r.label], dtype=torch.float32)
        out[figures.reward_mean(r.label)] = torch.nanmean(values).item()
        out[figures.reward_spread(r.label)] = nanstd(values).item()
    out[figures.FRAC_REWARD_ZERO_STD] = rollout.advantages.std_is_zero.float().mean().item()
    lengths = [len(c) for c in rollout.completion_ids]
    out[figures.MEAN_LENGTH] = sum(lengths) / len(lengths)
    out[figures.MIN_LENGTH] = float(min(lengths))
    out[figures.MAX_LENGTH] = float(max(lengths))
    out[figures.CLIPPED_RATIO] = sum(rollout.truncated) / len(lengths)
    ended = [n for n, t in zip(lengths, rollout.truncated, strict=True) if not t] or [0]
    out[figures.MEAN_TERMINATED_LENGTH] = sum(ended) / len(ended)
    return {k: round(v, 6) for k, v in out.items() if math.isfinite(v)}
