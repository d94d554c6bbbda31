"""The method's own figures (``Progress.metrics``, ``Eval.metrics``), sorted into charts without
knowing the method.

The engine names them as trl logs them: DPO/KTO/ORPO ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...; GRPO ``reward``,
``reward/<function>``, ``reward_std``, ``kl``, ``completion_length``, ``frac_reward_zero_std``.
A chart holds the figures that share the part of their name before the first "/"; the reward
chart comes first (the dashboard draws it beside the loss, the loss PNG under it). Shares (an
accuracy, a fraction) lie on a 0..1 scale of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PRIMARY_GROUPS = ("rewards", "reward")  # trl's preference methods, then GRPO
_SHARE = re.compile(r"accurac|(^|/)frac_")


def group_of(name: str) -> str:
    return name.split("/", 1)[0]


def is_share(name: str) -> bool:
    """A figure between 0 and 1 (reward accuracy, a fraction of prompts)."""
    return bool(_SHARE.search(name))


def label_of(name: str, group_size: int) -> str:
    """A figure's name within its chart: ``rewards/chosen`` -> ``chosen``; GRPO's ``reward`` beside
    its functions' ``reward/<function>`` -> ``total``; a figure alone keeps its name."""
    group = group_of(name)
    if name != group:
        return name[len(group) + 1 :]
    return "total" if group_size > 1 else name


def grouped(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(group, names) in the order the names came, the reward group (the larger one if both) first."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    primary = [g for g in PRIMARY_GROUPS if g in groups]
    first = max(primary, key=lambda g: len(groups[g])) if primary else None
    order = sorted(groups, key=lambda g: g != first)  # stable: the rest keep their order
    return [(g, groups[g]) for g in order]
