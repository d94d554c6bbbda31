"""A job's rewards, called in turn on a step's completions and summed with their weights.

The sum is trl's (``multi_objective_aggregation='sum_then_normalize'``): each function's rewards times
its weight, summed over the functions that apply (``None`` leaves a function out for that completion);
a completion no function scored is ``None`` (trl: NaN, advantage 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.contract.grpo import (
    AnswerReward,
    FormatReward,
    JsonReward,
    LengthReward,
    PythonReward,
    RewardChoice,
)
from engine.rewards.builtin import RewardFn, answer_reward, format_reward, json_reward, length_reward
from engine.rewards.user_code import checked_values, load_reward_function


@dataclass(frozen=True)
class Reward:
    label: str  # its name in metrics: rewards/<label>/mean
    weight: float
    fn: RewardFn


def default_label(choice: RewardChoice) -> str:
    if isinstance(choice, PythonReward):
        stem = "".join(c if c.isalnum() or c in "_.-" else "_" for c in choice.path.rsplit("/", 1)[-1])
        return stem.removesuffix(".py") or "python"
    return choice.name


def build_rewards(choices: Sequence[RewardChoice], max_completion_length: int) -> list[Reward]:
    """The callables of a spec's ``grpo.rewards`` (the user's files are loaded here: in the worker)."""
    rewards: list[Reward] = []
    seen: dict[str, int] = {}
    for choice in choices:
        label = choice.label or default_label(choice)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two format rewards: format, format_2
            label = f"{label}_{seen[label]}"
        if isinstance(choice, AnswerReward):
            fn = answer_reward(choice)
        elif isinstance(choice, FormatReward):
            fn = format_reward(choice)
        elif isinstance(choice, JsonReward):
            fn = json_reward(choice)
        elif isinstance(choice, LengthReward):
            fn = length_reward(choice, max_completion_length)
        else:
            fn = load_reward_function(choice.path, choice.function)
        rewards.append(Reward(label, choice.weight, fn))
    return rewards


@dataclass
class Scores:
    """One step's rewards: per function (NaN where it did not apply) and their weighted sum."""

    per_function: dict[str, list[float]]
    total: list[float]  # NaN where no function applied


def score(
    rewards: Sequence[Reward],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: Mapping[str, Sequence[Any]],
) -> Scores:
    """Call every reward on the completions (one prompt and one row's columns per completion)."""
    per_function: dict[str, list[float]] = {}
    for reward in rewards:
        # the call's own arguments are engine.contract.grpo.REWARD_ARGUMENTS (no column has their names)
        values = reward.fn(prompts, completions, completion_ids=completion_ids, **columns)
        checked = checked_values(values, len(completions), f"the reward {reward.label!r}")
        per_function[reward.label] = [math.nan if v is None else v for v in checked]
    total: list[float] = []
    for i in range(len(completions)):
        parts = [
            r.weight * per_function[r.label][i] for r in rewards if not math.isnan(per_function[r.label][i])
        ]
        total.append(sum(parts) if parts else math.nan)
    return Scores(per_function, total)
