"""The figures a GRPO step reports in ``Progress.metrics``, named as trl's GRPOTrainer logs them.

Declared once: the step writes its figures under these names (engine.training.grpo_rollout and
grpo_step), and whoever reads them (the server's charts, the tests' stand-in worker) takes them from
here, so a view and the engine cannot name a figure differently.
"""

from __future__ import annotations

from collections.abc import Sequence

REWARD = "reward"  # the weighted sum of the rewards, its mean over the step's completions
REWARD_STD = "reward_std"  # ... and its spread
FRAC_REWARD_ZERO_STD = "frac_reward_zero_std"  # the share of prompts with no learning signal
KL = "kl"  # with grpo_beta > 0: the policy's KL divergence from the reference, per completion token
MEAN_LENGTH = "completions/mean_length"  # completion lengths, in tokens
MIN_LENGTH = "completions/min_length"
MAX_LENGTH = "completions/max_length"
MEAN_TERMINATED_LENGTH = "completions/mean_terminated_length"  # of those that ended before the limit
CLIPPED_RATIO = "completions/clipped_ratio"  # the share cut off at grpo_max_completion_length
SAMPLING_SECONDS = "timing/sampling_s"  # the step's sampling time (the rest is learning)


def reward_mean(label: str) -> str:
    """One reward function's mean over the step's completions."""
    return f"rewards/{label}/mean"


def reward_spread(label: str) -> str:
    """One reward function's standard deviation over the step's completions."""
    return f"rewards/{label}/std"


def step_figures(labels: Sequence[str], with_kl: bool) -> list[str]:
    """Every figure one step reports, in its order, for reward functions ``labels`` (with_kl: beta > 0)."""
    per_function = [name for label in labels for name in (reward_mean(label), reward_spread(label))]
    lengths = [MEAN_LENGTH, MIN_LENGTH, MAX_LENGTH, CLIPPED_RATIO, MEAN_TERMINATED_LENGTH]
    return [
        REWARD, REWARD_STD, *per_function, FRAC_REWARD_ZERO_STD, *lengths, SAMPLING_SECONDS,
        *([KL] if with_kl else []),
    ]  # fmt: skip
