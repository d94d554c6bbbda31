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
``dare_*`` combinations, which is not a merge of ΔW; hence this module.

Adapters are handled as ``dict[module_key, LoraFactors]`` where ``module_key`` is the
state-dict prefix before ``.lora_A`` (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``).
``split_lora_state``/``join_lora_state`` convert from and to PEFT state dicts (both the saved
form ``...lora_A.weight`` and the in-model form ``...lora_A.default.weight``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

# re-exported: the series and the benchmarks call slao.forgetting_metrics
from engine.cl_metrics import forgetting_metrics as forgetting_metrics

MergeWeight = Literal["inv_sqrt", "inv"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraFactors:
    """One target module's LoRA factors: A is r×n (in-features), B is m×r (out-features)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """B·A in float32 (without the scaling s)."""
        return self.B.float() @ self.A.float()


Adapter = dict[str, LoraFactors]


# ---------------------------------------------------------------------------------------------
# PEFT state dicts <-> factors


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``prefix.lora_A[.adapter].weight`` -> (prefix, "A", suffix_without_prefix)."""
    for which in ("A", "B"):
        marker = f".lora_{which}."
        pos = key.find(marker)
        if pos >= 0 and key.endswith(".weight"):
            return key[:pos], which, key[pos + 1 :]
    return None


def split_lora_state(state: Mapping[str, torch.Tensor]) -> tuple[Adapter, dict[str, torch.Tensor], str]:
    """Split a PEFT LoRA state dict into factors per module.

    Returns (factors, other_entries, key_style) where ``key_style`` is the part after the
    prefix for A (``lora_A.weight`` or ``lora_A.default.weight``), used by ``join_lora_state``
    to write keys back in the same form. Entries that are not LoRA A/B (e.g. modules_to_save)
    are returned untouched in ``other_entries``.
    """
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    style = "lora_A.weight"
    for key, value in state.items():
        parts = _split_key(key)
        if parts is None:
            other[key] = value
            continue
        prefix, which, suffix = parts
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{key}: DoRA adapters are not supported by SLAO merging; train plain LoRA")
        if which == "A":
            a[prefix] = value
            style = suffix
        else:
            b[prefix] = value
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"LoRA state dict has A without B (or B without A) for: {missing[:5]}")
    if not a:
        raise ValueError("no LoRA weights (keys containing '.lora_A.' / '.lora_B.') in this state dict")
    factors: Adapter = {}
    for prefix in a:
        A, B = a[prefix], b[prefix]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{prefix}: expected A r×n and B m×r, got A {tuple(A.shape)} and B {tuple(B.shape)} "
                "(convolutional or embedding LoRA layers are not supported)"
            )
        factors[prefix] = LoraFactors(A=A, B=B)
    return factors, other, style


def join_lora_state(
    factors: Adapter, other: Mapping[str, torch.Tensor] | None = None, key_style: str = "lora_A.weight"
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_lora_state``."""
    state: dict[str, torch.Tensor] = dict(other or {})
    b_style = key_style.replace("lora_A", "lora_B", 1)
    for prefix, f in factors.items():
        state[f"{prefix}.{key_style}"] = f.A
        state[f"{prefix}.{b_style}"] = f.B
    return state


def clone_adapter(adapter: Adapter) -> Adapter:
    return {k: LoraFactors(A=f.A.detach().clone(), B=f.B.detach().clone()) for k, f in adapter.items()}


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


def effective_weights(num_runs: int, schedule: MergeWeight = "inv_sqrt") -> list[float]:
    """Weight of each fine-tuned B_ft(k) in B_m after ``num_runs`` SLAO merges (they sum to 1)."""
    weights: list[float] = []
    for i in range(1, num_runs + 1):
        lam = merge_weight(i, schedule)
        weights = [w * (1.0 - lam) for w in weights] + [lam]
    return weights


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


def _trim_to_density(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries with the largest magnitude (TIES 'trim')."""
    if density >= 1.0:
        return delta
    keep = max(1, int(round(density * delta.numel())))
    threshold = torch.topk(delta.abs().flatten(), keep, sorted=False).values.min()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_merge(
    finetuned: Sequence[Adapter], density: float = 0.5, rank: int | None = None
) -> tuple[Adapter, MergeReport]:
    """TIES merging of the task vectors ΔW_k = B_k·A_k, truncated to rank r.

    Two passes per module (sign election, then disjoint mean) keep memory at a few m×n
    matrices regardless of how many runs there were.
    """
    if not finetuned:
        raise ValueError("ties merge needs at least one adapter")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    report = MergeReport()
    out: Adapter = {}
    for key, first in finetuned[0].items():
        sign_sum = torch.zeros_like(first.delta())
        for a in finetuned:
            sign_sum += _trim_to_density(a[key].delta(), density)
        elected = torch.sign(sign_sum)
        total = torch.zeros_like(sign_sum)
        count = torch.zeros_like(sign_sum)
        for a in finetuned:
            trimmed = _trim_to_density(a[key].delta(), density)
            agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
            total += torch.where(agrees, trimmed, torch.zeros_like(trimmed))
            count += agrees.float()
        merged = total / count.clamp_min(1.0)
        B, A, err = dense_truncate(merged, rank or first.rank)
        out[key] = _finish(B, A, first, err, report)
    return out, report


def dare_merge(
    finetuned: Sequence[Adapter], drop: float = 0.5, seed: int = 0, rank: int | None = None
) -> tuple[Adapter, MergeReport]:
    """DARE: drop entries of each ΔW_k with probability ``drop``, rescale by 1/(1−drop), average.

    The masks come from a generator seeded by (seed, run index, module), so the same inputs
    always give the same merge (a resumed series reproduces it).
    """
    if not finetuned:
        raise ValueError("dare merge needs at least one adapter")
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare drop probability must be in [0, 1), got {drop}")
    report = MergeReport()
    out: Adapter = {}
    for m_index, (key, first) in enumerate(finetuned[0].items()):
        acc = torch.zeros_like(first.delta())
        for k, a in enumerate(finetuned):
            delta = a[key].delta()
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + k * 10_007 + m_index)
            keep = torch.rand(delta.shape, generator=gen) >= drop
            acc += torch.where(keep.to(delta.device), delta / (1.0 - drop), torch.zeros_like(delta))
        B, A, err = dense_truncate(acc / len(finetuned), rank or first.rank)
        out[key] = _finish(B, A, first, err, report)
    return out, report


# ---------------------------------------------------------------------------------------------
# saving and loading adapter folders


def adapter_scaling(config: Mapping[str, Any]) -> float:
    """s for an adapter_config.json: lora_alpha / r (or / √r with rsLoRA)."""
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(
            "adapters with per-module rank_pattern/alpha_pattern are not supported by SLAO merging"
        )
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def load_adapter(folder: str | Path) -> tuple[Adapter, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a PEFT adapter folder: (factors, other state entries, adapter_config dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a PEFT adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    factors, other, _ = split_lora_state(load_file(str(weights_path)))
    return factors, other, config


def save_adapter(
    folder: str | Path,
    factors: Adapter,
    config: Mapping[str, Any],
    other: Mapping[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write an ordinary PEFT adapter folder (config + safetensors) atomically.

    ``config`` is the adapter_config.json of the series' adapters (same r, alpha, targets), so
    peft loads the result unchanged. Every merge here keeps rank r, which the config states;
    a factor with another rank is refused rather than saved into an unloadable folder. The
    folder is written beside its final place and renamed into it, so a crash leaves either the
    previous folder or the new one.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    r = int(config["r"])
    for key, f in factors.items():
        if f.rank != r:
            raise ValueError(f"{key}: factors have rank {f.rank} but the adapter config says r={r}")
    state = {k: v.detach().contiguous().cpu() for k, v in join_lora_state(factors, other).items()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(dict(config), indent=2, sort_keys=True), encoding="utf-8"
        )
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (rename-based)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
