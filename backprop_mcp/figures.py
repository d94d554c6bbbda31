"""The method's own figures (``Progress.metrics``, ``Eval.metrics``), sorted into charts without
knowing the method.

The engine names them as trl logs them: DPO/KTO/ORPO ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...; GRPO (declared in
``engine.contract.grpo_figures``) ``reward``, ``reward_std``, ``rewards/<function>/mean`` and
``/std``, ``frac_reward_zero_std``, ``completions/mean_length`` (and min, max, mean_terminated),
``completions/clipped_ratio``, ``kl``, ``timing/sampling_s``.

A chart holds the figures that share the part of their name before the first "/", with three
exceptions, so that GRPO's charts read as trl's: a reward function's mean joins the total
``reward`` (the reward chart) and its spread the total ``reward_std``, and the share of completions
cut off leaves the lengths (in tokens) for a chart of its own. The reward chart comes first (the
dashboard draws it beside the loss, the loss PNG under it). Shares (an accuracy, a fraction) lie on
a 0..1 scale of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

PRIMARY_GROUPS = ("rewards", "reward")  # trl's preference methods, GRPO
_SHARE = re.compile(r"accurac|(^|/)frac_|(^|/)clipped_ratio$")
# Figures whose chart is not their name's prefix: (pattern, chart); the pattern's group is the label.
_PLACED = (
    (re.compile(r"^rewards/(.+)/mean$"), "reward"),
    (re.compile(r"^rewards/(.+)/std$"), "reward_std"),
    (re.compile(r"^completions/(clipped_ratio)$"), "clipped_ratio"),
    (re.compile(r"^completions/(.+)_length$"), "completions"),
)


def _placed(name: str) -> tuple[str, str] | None:
    """(chart, label) of a figure placed by ``_PLACED``, else None."""
    for pattern, group in _PLACED:
        if m := pattern.match(name):
            return group, m.group(1)
    return None


def group_of(name: str) -> str:
    placed = _placed(name)
    return placed[0] if placed else name.split("/", 1)[0]


def is_share(name: str) -> bool:
    """A figure between 0 and 1 (reward accuracy, a fraction of prompts or of completions)."""
    return bool(_SHARE.search(name))


def label_of(name: str, group_size: int) -> str:
    """A figure's name within its chart: ``rewards/chosen`` -> ``chosen``, ``rewards/format/mean`` ->
    ``format``; a total beside its parts (GRPO's ``reward``, ``reward_std``) -> ``total``; a figure
    alone keeps its name."""
    if placed := _placed(name):
        return placed[1]
    group = group_of(name)
    if name != group:
        return name[len(group) + 1 :]
    return "total" if group_size > 1 else name


def grouped(names: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(group, names) in the order the names came, the reward group first."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(group_of(name), []).append(name)
    first = next((g for g in PRIMARY_GROUPS if g in groups), None)
    order = sorted(groups, key=lambda g: g != first)  # stable: the rest keep their order
    return [(g, groups[g]) for g in order]
