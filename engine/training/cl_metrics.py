"""Continual-learning metrics over an evaluation matrix R[t][i] (score on task i after run t).

Re-exported as ``engine.training.slao.forgetting_metrics``; kept apart so that ``slao.py`` holds the merge
math only. Definitions (T runs, 0-based indices below, i ranging over tasks):

* average accuracy AA = mean_i R[T−1][i]
* backward transfer BWT = mean_{i<T−1} (R[T−1][i] − R[i][i])                (< 0: forgetting)
* forgetting F = mean_{i<T−1} (max_{i≤l<T−1} R[l][i] − R[T−1][i])
* plasticity = mean_i R[i][i]
* forward transfer FWT = mean_{i≥1} (R[i−1][i] − b_i), b_i the base model's score on task i
  (needs the super-diagonal: task i scored *before* it is trained on)
* intransigence = mean_i (R_ind[i] − R[i][i]), R_ind[i] the score of a LoRA trained on task i
  alone (> 0: the series learns new tasks less well than a fresh adapter would)
"""

from __future__ import annotations

from collections.abc import Sequence


def forgetting_metrics(
    matrix: Sequence[Sequence[float | None]],
    higher_is_better: bool = True,
    base_scores: Sequence[float] | None = None,
    independent_scores: Sequence[float] | None = None,
) -> dict[str, float | None]:
    """AA ("average"), BWT, forgetting and plasticity of R; FWT and intransigence when given references.

    ``forward_transfer`` is in the result only when ``base_scores`` (b_i, one per task) is given,
    ``intransigence`` only when ``independent_scores`` (R_ind[i]) is. For a loss matrix pass
    ``higher_is_better=False``: scores (and references) are negated first, so BWT < 0,
    forgetting > 0 and intransigence > 0 still mean "worse".
    """
    t_count = len(matrix)
    out: dict[str, float | None] = {
        "average": None,
        "backward_transfer": None,
        "forgetting": None,
        "plasticity": None,
    }
    for name, ref in (("forward_transfer", base_scores), ("intransigence", independent_scores)):
        if ref is not None:
            if len(ref) != t_count:
                raise ValueError(
                    f"{name} needs one reference score per task: got {len(ref)} for {t_count} tasks"
                )
            out[name] = None
    if t_count == 0:
        return out
    sign = 1.0 if higher_is_better else -1.0

    def r(t: int, i: int) -> float:
        v = matrix[t][i] if i < len(matrix[t]) else None
        if v is None:
            raise ValueError(f"R[{t}][{i}] is missing")
        return sign * float(v)

    last = t_count - 1
    out["average"] = sum(r(last, i) for i in range(t_count)) / t_count
    out["plasticity"] = sum(r(i, i) for i in range(t_count)) / t_count
    if t_count > 1:
        out["backward_transfer"] = sum(r(last, i) - r(i, i) for i in range(last)) / last
        out["forgetting"] = (
            sum(max(r(lv, i) for lv in range(i, last)) - r(last, i) for i in range(last)) / last
        )
        if base_scores is not None:  # R[i−1][i]: task i before training on it, against the base
            out["forward_transfer"] = (
                sum(r(i - 1, i) - sign * float(base_scores[i]) for i in range(1, t_count)) / last
            )
    if independent_scores is not None:
        out["intransigence"] = (
            sum(sign * float(independent_scores[i]) - r(i, i) for i in range(t_count)) / t_count
        )
    for key in ("average", "plasticity"):  # back to the matrix's own units
        out[key] = sign * out[key]  # type: ignore[operator]
    return out
