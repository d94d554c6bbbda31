"""SLAO merge and initialisation math, as plain tensor code over PEFT LoRA state dicts.

SLAO (Qiao & Mahdavi, "Merge before Forget", arXiv:2512.23017) trains one LoRA adapter
(ΔW = s·B·A per target module; A is r×n, B is m×r) over a series of tasks:

* run 1 starts from the standard LoRA initialisation;
* run i ≥ 2 starts from A = Qᵀ, where Q·R is the reduced QR factorisation of the previous
  *fine-tuned* Aᵀ (signs fixed so that diag(R) ≥ 0), hence A·Aᵀ = I, and from B = the
  previous *fine-tuned* B;
* after run i the merged adapter takes the new A as is and moves its B towards the new
  fine-tuned B with the time-aware weight λ(i) = 1/√i (or 1/i):
  B_m ← B_m + λ(i)·(B_ft(i) − B_m).

The other merge modes work on ΔW = B·A (the scaling s is the same for every adapter of a
series, so it factors out and is left to the adapter config):

* ``sequential`` — no merge: the deliverable is the last fine-tuned adapter. Exact.
* ``slao`` — exact: the merged adapter is a rank-r LoRA by construction.
* ``linear`` — the average (1/t)·Σ B_k·A_k over the t runs so far, re-factorised to rank r
  by SVD. Exact whenever that average has rank ≤ r (for instance when every run shares the
  same A); otherwise it is the best rank-r approximation of the average (Eckart–Young),
  and the relative error of the truncation is reported.
* ``ties`` — TIES merging of the task vectors ΔW_k (trim each to its largest-magnitude
  ``density`` fraction, elect a sign per entry by the summed trimmed values, average the
  entries that agree with it), then truncated to rank r by SVD. Approximate: the trimmed,
  sign-elected result is in general full rank.
* ``dare`` — DARE: drop each entry of every ΔW_k with probability p, rescale the survivors
  by 1/(1−p), average, truncate to rank r. Approximate for the same reason (and random,
  with a seeded generator so that a resumed series reproduces it).

peft's own ``add_weighted_adapter`` merges A and B separately for its ``linear``/``ties``/
``dare_*`` combinations, which is not a merge of ΔW; hence this module. The element-wise steps
of TIES and DARE (trim, sign election, disjoint mean, random drop) are peft's
``peft.utils.merge_utils``, applied to the ΔW matrices.

Adapters are ``engine.models.adapters.Adapter`` (``dict[module_key, LoraFactors]``); reading and
writing them is ``engine.models.adapters``'s job, not this module's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from peft.utils import merge_utils

from engine.contract.spec import SeriesSpec
from engine.models.adapters import Adapter, LoraFactors, clone_adapter

# re-exported: the series and the benchmarks call slao.forgetting_metrics
from engine.training.cl_metrics import forgetting_metrics as forgetting_metrics

MergeWeight = Literal["inv_sqrt", "inv"]


def _check_same_modules(first: Adapter, second: Adapter, what: str) -> None:
    if set(first) != set(second):
        diff = sorted(set(first) ^ set(second))
        raise ValueError(f"{what}: the adapters adapt different modules (e.g. {diff[:3]})")
    for key in first:
        if first[key].A.shape != second[key].A.shape or first[key].B.shape != second[key].B.shape:
            raise ValueError(f"{what}: {key} has different shapes in the two adapters (different ranks?)")


# ---------------------------------------------------------------------------------------------
# SLAO initialisation and merge


def orthogonal_init_A(A_prev: torch.Tensor) -> torch.Tensor:
    """A = Qᵀ where Q·R = reduced QR of A_prevᵀ with signs fixed (diag(R) ≥ 0); A·Aᵀ = I_r.

    The sign fix makes the factorisation unique, so Qᵀ keeps the row directions of A_prev
    (row k of the result is the part of A_prev's row k orthogonal to the rows before it).
    Computed in float64 for accuracy, returned in A_prev's dtype and device.
    """
    r, n = A_prev.shape
    if r > n:
        raise ValueError(f"orthogonal init needs rank r ≤ in-features n, got A of shape {r}×{n}")
    q, rr = torch.linalg.qr(A_prev.detach().to(torch.float64).T, mode="reduced")  # q: n×r
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0  # a zero pivot (rank-deficient A) has no sign; keep the column as is
    return (q * signs).T.contiguous().to(dtype=A_prev.dtype, device=A_prev.device)


def merge_weight(i: int, schedule: MergeWeight = "inv_sqrt") -> float:
    """λ(i) for run i (1-indexed): 1/√i or 1/i. λ(1) = 1, so the first merge copies run 1."""
    if i < 1:
        raise ValueError(f"runs are numbered from 1, got {i}")
    if schedule == "inv_sqrt":
        return 1.0 / math.sqrt(i)
    if schedule == "inv":
        return 1.0 / i
    raise ValueError(f"unknown merge weight schedule {schedule!r}; use 'inv_sqrt' or 'inv'")


def slao_init(previous_finetuned: Adapter, qr_init: bool = True) -> Adapter:
    """Initial factors for the next run: A orthogonalised (or copied), B = previous fine-tuned B."""
    init: Adapter = {}
    for key, f in previous_finetuned.items():
        A = orthogonal_init_A(f.A) if qr_init else f.A.detach().clone()
        init[key] = LoraFactors(A=A, B=f.B.detach().clone())
    return init


def slao_merge(
    merged: Adapter | None, finetuned: Adapter, i: int, schedule: MergeWeight = "inv_sqrt"
) -> Adapter:
    """The SLAO merge after run i: A_m = A_ft(i); B_m += λ(i)·(B_ft(i) − B_m).

    ``merged`` is None for run 1 (λ(1) = 1 makes the result a copy of the fine-tuned adapter).
    """
    lam = merge_weight(i, schedule)
    if merged is None:
        if i != 1:
            raise ValueError(f"run {i} needs the merged adapter of the runs before it")
        return clone_adapter(finetuned)
    _check_same_modules(merged, finetuned, "slao merge")
    out: Adapter = {}
    for key, ft in finetuned.items():
        b_m = merged[key].B.float()
        b_new = b_m + lam * (ft.B.float() - b_m)
        out[key] = LoraFactors(A=ft.A.detach().clone(), B=b_new.to(ft.B.dtype))
    return out


# ---------------------------------------------------------------------------------------------
# merges of ΔW and re-factorisation to rank r


@dataclass
class MergeReport:
    """How faithful a ΔW merge is after truncation to rank r (0.0 = exact)."""

    max_relative_error: float = 0.0  # max over modules of ||ΔW − ΔW_r||_F / ||ΔW||_F
    exact: bool = True


def _split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
    """B = U_r·√S_r, A = √S_r·V_rᵀ, zero-padded to rank r if fewer singular values exist."""
    k = min(r, s.shape[0])
    root = torch.sqrt(s[:k].clamp_min(0))
    B = u[:, :k] * root
    A = root[:, None] * vh[:k]
    if k < r:  # keep the adapter's rank: the extra directions contribute nothing
        B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1)
        A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0)
    return B, A


def _relative_tail(s: torch.Tensor, r: int) -> float:
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 0.0
    return math.sqrt(float((s[r:].double() ** 2).sum()) / total)


def factorised_truncate(
    left: torch.Tensor, right: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors (B, A) of ΔW = left·right (left m×k, right k×n) without forming ΔW.

    QR of both factors reduces the SVD to a k×k core, so this is cheap when k ≪ m, n.
    Returns (B, A, relative Frobenius error of the truncation); exact (error 0) if rank ≤ r.
    """
    left64, right64 = left.to(torch.float64), right.to(torch.float64)
    q1, r1 = torch.linalg.qr(left64, mode="reduced")  # m×k, k×k
    q2, r2 = torch.linalg.qr(right64.T, mode="reduced")  # n×k, k×k
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    B, A = _split_singular(q1 @ u, s, vh @ q2.T, r)
    return B, A, _relative_tail(s, r)


def dense_truncate(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors (B, A) of a dense ΔW (m×n), and the relative truncation error."""
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    B, A = _split_singular(u, s, vh, r)
    return B, A, _relative_tail(s, r)


def _finish(
    B: torch.Tensor, A: torch.Tensor, like: LoraFactors, err: float, report: MergeReport
) -> LoraFactors:
    report.max_relative_error = max(report.max_relative_error, err)
    if err > 1e-6:
        report.exact = False
    return LoraFactors(A=A.to(like.A.dtype).contiguous(), B=B.to(like.B.dtype).contiguous())


def linear_merge(finetuned: Sequence[Adapter], rank: int | None = None) -> tuple[Adapter, MergeReport]:
    """(1/t)·Σ_k B_k·A_k for the t fine-tuned adapters, re-factorised to rank r (see module doc)."""
    if not finetuned:
        raise ValueError("linear merge needs at least one adapter")
    for other in finetuned[1:]:
        _check_same_modules(finetuned[0], other, "linear merge")
    t = len(finetuned)
    report = MergeReport()
    out: Adapter = {}
    for key, first in finetuned[0].items():
        r = rank or first.rank
        left = torch.cat([a[key].B.float() / t for a in finetuned], dim=1)  # m × t·r
        right = torch.cat([a[key].A.float() for a in finetuned], dim=0)  # t·r × n
        B, A, err = factorised_truncate(left, right, r)
        out[key] = _finish(B, A, first, err, report)
    return out, report


def _merge_deltas(
    finetuned: Sequence[Adapter], rank: int | None, combine: Callable[[list[torch.Tensor], int], torch.Tensor]
) -> tuple[Adapter, MergeReport]:
    """Per module: ``combine`` the task vectors ΔW_k = B_k·A_k, then truncate to rank r by SVD."""
    for other in finetuned[1:]:
        _check_same_modules(finetuned[0], other, "merge")
    report = MergeReport()
    out: Adapter = {}
    for m_index, (key, first) in enumerate(finetuned[0].items()):
        merged = combine([a[key].delta() for a in finetuned], m_index)
        B, A, err = dense_truncate(merged, rank or first.rank)
        out[key] = _finish(B, A, first, err, report)
    return out, report


def ties_merge(
    finetuned: Sequence[Adapter], density: float = 0.5, rank: int | None = None
) -> tuple[Adapter, MergeReport]:
    """TIES merging of the task vectors ΔW_k = B_k·A_k, truncated to rank r.

    Each ΔW_k keeps its ``density`` fraction of largest-magnitude entries, a sign is elected per
    entry by the summed trimmed values, and the entries that agree with it are averaged. peft
    stacks the t task vectors of a module, so a merge holds t m×n float32 matrices at a time.
    """
    if not finetuned:
        raise ValueError("ties merge needs at least one adapter")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density}")

    def combine(deltas: list[torch.Tensor], _: int) -> torch.Tensor:
        if density < 1.0:  # peft warns on density 1 and returns the tensor unchanged
            deltas = [merge_utils.prune(d, density, method="magnitude") for d in deltas]
        stacked = torch.stack(deltas)
        return merge_utils.disjoint_merge(stacked, merge_utils.calculate_majority_sign_mask(stacked))

    return _merge_deltas(finetuned, rank, combine)


def dare_merge(
    finetuned: Sequence[Adapter], drop: float = 0.5, seed: int = 0, rank: int | None = None
) -> tuple[Adapter, MergeReport]:
    """DARE: drop entries of each ΔW_k with probability ``drop``, rescale by 1/(1−drop), average.

    The random masks are drawn from a generator seeded by (seed, module), so the same inputs
    always give the same merge (a resumed series reproduces it).
    """
    if not finetuned:
        raise ValueError("dare merge needs at least one adapter")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare drop probability must be in [0, 1), got {drop}")

    def combine(deltas: list[torch.Tensor], m_index: int) -> torch.Tensor:
        if drop > 0.0:
            device = deltas[0].device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + m_index)
                deltas = [merge_utils.prune(d, 1.0 - drop, method="random", rescale=True) for d in deltas]
        return torch.stack(deltas).mean(dim=0)

    return _merge_deltas(finetuned, rank, combine)


# ---------------------------------------------------------------------------------------------
# a series' merge step


def initial_factors(spec: SeriesSpec, previous_finetuned: Adapter) -> Adapter:
    """Run i ≥ 2 starts from run i−1's fine-tuned adapter; SLAO-family modes orthogonalise A.

    ``sequential`` keeps training the same adapter (no QR). ``linear``/``ties``/``dare`` share
    SLAO's initialisation (``qr_init`` applies), so the modes differ only in how they merge.
    """
    if spec.merge_mode == "sequential":
        return clone_adapter(previous_finetuned)
    return slao_init(previous_finetuned, qr_init=spec.qr_init)


def merge_run(
    spec: SeriesSpec, run: int, merged: Adapter | None, finetuned: Sequence[Adapter]
) -> tuple[Adapter, MergeReport]:
    """The merged adapter after ``run`` for the spec's merge mode.

    ``finetuned`` is every run's fine-tuned adapter so far for the ΔW modes (linear, ties, dare);
    the other modes read only the last one.
    """
    mode, last = spec.merge_mode, finetuned[-1]
    if mode == "sequential":
        return clone_adapter(last), MergeReport()
    if mode == "slao":
        return slao_merge(merged, last, run, spec.merge_weight), MergeReport()
    if mode == "linear":
        return linear_merge(finetuned)
    if mode == "ties":
        return ties_merge(finetuned, density=spec.ties_density)
    if mode == "dare":
        return dare_merge(finetuned, drop=spec.dare_drop, seed=spec.train.seed)
    raise ValueError(f"unknown merge_mode {mode!r}")
