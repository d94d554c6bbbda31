"""Attention for packed rows without a dense mask: flash-attention's variable-length kernel.

A packed row holds several examples end to end. With SDPA, transformers turns the per-example
position ids into a dense block-causal [rows, 1, L, L] mask, which rules out the flash kernel
(the memory-efficient one runs instead) and costs a host sync to detect the packing. Here the
micro-batch's example boundaries go in as cumulative sequence lengths, built once per micro-batch
on the CPU (``cu_seqlens``): every row is flattened to one stream of tokens and torch's own
flash-attention varlen kernel (``aten._flash_attention_forward``; no package to build) attends
causally inside each example only.

How it plugs into transformers: ``engine_varlen`` is registered in transformers'
``AttentionInterface`` and switched on for the training step only (``varlen_attention(model)``,
a context around forward *and* backward, since gradient checkpointing re-runs attention in the
backward pass). The micro-batch passes ``cu_seq_lens_q``/``max_length_q`` as model keyword
arguments, which transformers hands to every attention call. With no such arguments (unpacked
rows) it is plain SDPA with ``is_causal``. Evaluation and generation run outside the context
on plain SDPA. No mask function is registered for the name, so transformers builds no mask.

Which kernel (``varlen_kernel``, decided once per model by the fast path and named in the run's
log): FlashAttention-4 (``flash-attn-4``, the CuTeDSL kernels: Hopper and Blackwell forward and
backward, key/value heads taken as they are) where it imports and supports the GPU, else torch's
flash kernel. ``BACKPROP_VARLEN_KERNEL`` = ``torch`` or ``fa4`` picks one (benchmarks compare them);
``fa4`` where FlashAttention-4 cannot run is an error. With FlashAttention-4, rows of one example
each (no ``cu_seq_lens_q``) take its fixed-length causal kernel where ``FA4_FIXED_ROWS`` is on, else
SDPA (cuDNN on Hopper).

On the CPU, or where the flash kernel is missing, the same interface computes each example with
SDPA one by one (``reference_varlen``): the path tests check against.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

VARLEN_FLAG = "_engine_varlen"  # on a model (set by the native fast path): its varlen kernel's name
KERNEL_ENV = "BACKPROP_VARLEN_KERNEL"  # "auto" (default), "fa4" or "torch"
# Fixed rows (one example each) through FlashAttention-4's causal kernel instead of SDPA/cuDNN.
FA4_FIXED_ROWS = os.environ.get("BACKPROP_FA4_FIXED_ROWS", "0") == "1"
_ACTIVE: dict[str, str] = {"kernel": "torch"}  # the kernel of the model inside ``varlen_attention``

NAME = "engine_varlen"
_KV_AS_IS: dict[tuple[Any, ...], bool | None] = {}  # flash_varlen_kv_as_is's answers


def cu_seqlens_for_rows(segments: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Cumulative lengths over the flattened micro-batch: ``segments[r]`` = token counts of row r's
    pieces (its examples, then any padding as one more piece); every row must sum to the same length."""
    cu = [0]
    for row in segments:
        for n in row:
            if n > 0:
                cu.append(cu[-1] + n)
    longest = max((n for row in segments for n in row), default=0)
    return torch.tensor(cu, dtype=torch.int32), longest


def flash_varlen_available(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """torch's flash kernel: an Ampere-or-newer NVIDIA GPU, 16-bit inputs, head size up to 256."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim > 256:
        return False
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    return (
        torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(device)[0] >= 8
    )


def flash_varlen_kv_as_is(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> bool | None:
    """None: no flash kernel for these shapes; else whether it takes fewer key/value heads than query
    heads as they are (torch builds differ) rather than repeated. Probed once per shape, eagerly: the
    fast path asks before anything is compiled, and compiled attention only reads the answer."""
    key = (torch.device(device), dtype, head_dim, heads, kv_heads)
    if key not in _KV_AS_IS:
        as_is = None
        if flash_varlen_available(device, dtype, head_dim):
            as_is = heads == kv_heads
            if not as_is:
                q = torch.zeros(2, heads, head_dim, device=device, dtype=dtype)
                kv = torch.zeros(2, kv_heads, head_dim, device=device, dtype=dtype)
                cu = torch.tensor([0, 2], dtype=torch.int32, device=device)
                with contextlib.suppress(RuntimeError):
                    torch.ops.aten._flash_attention_forward(q, kv, kv, cu, cu, 2, 2, 0.0, True, False)
                    as_is = True
        _KV_AS_IS[key] = as_is
    return _KV_AS_IS[key]


@functools.cache
def _fa4() -> tuple[Callable[..., Any], Callable[..., Any], str] | None:
    """FlashAttention-4's varlen and fixed-length functions and version, or None where it does not
    import (an optional dependency: ``pip install flash-attn-4``)."""
    try:
        from importlib.metadata import version

        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception:  # not installed, or its CUDA/CuTeDSL stack does not load here
        return None
    try:
        ver = version("flash-attn-4")
    except Exception:
        ver = "?"
    return flash_attn_varlen_func, flash_attn_func, ver


def fa4_available(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> bool:
    """FlashAttention-4 imports and has forward and backward kernels for this GPU (Hopper or newer),
    16-bit inputs and a head size from 8 to 256 in steps of 8."""
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (8 <= head_dim <= 256 and head_dim % 8 == 0):
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return _fa4() is not None


def varlen_kernel(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, heads: int, kv_heads: int
) -> str | None:
    """The kernel packed rows will use: "fa4", "torch" (its flash kernel), or None (neither: the
    model keeps plain SDPA, which builds a dense mask for packed rows)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "fa4", "torch"):
        raise ValueError(f"{KERNEL_ENV} must be auto, fa4 or torch, not {choice!r}")
    if choice != "torch" and fa4_available(device, dtype, head_dim):
        return "fa4"
    if choice == "fa4":
        raise RuntimeError(
            f"{KERNEL_ENV}=fa4 but FlashAttention-4 cannot run here (it needs `pip install flash-attn-4`, "
            f"a Hopper or newer GPU, 16-bit inputs and a head size of 8-256): unset it to use torch's kernel"
        )
    return "torch" if flash_varlen_kv_as_is(device, dtype, head_dim, heads, kv_heads) is not None else None


def kernel_description(kernel: str) -> str:
    """How the run's log names a kernel."""
    if kernel == "fa4":
        found = _fa4()
        fixed = "; fixed rows too" if FA4_FIXED_ROWS else "; fixed rows through SDPA"
        return f"FlashAttention-4 {found[2] if found else ''}".strip() + fixed
    return "torch's flash-attention varlen kernel"


class _FlashVarlen(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu: torch.Tensor,
        max_len: int,
        scale: float,
    ) -> torch.Tensor:
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, 0.0, True, seed, offset,
            scale=ctx.scale,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


@torch.compiler.disable  # its loop depends on cu's values: under torch.compile it runs eager, as one piece
def reference_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float
) -> torch.Tensor:
    """Same result as the flash kernel, one example at a time with SDPA ([tokens, heads, dim] layout)."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=False):
        if end == start:  # a zero-length piece: padding of the boundaries to a fixed count
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        if groups > 1:
            ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q/k/v [batch, heads, length, dim] -> [batch, length, heads, dim]."""
    cu = kwargs.get("cu_seq_lens_q")
    batch, heads, length, dim = query.shape
    scale = scaling if scaling is not None else dim**-0.5
    fa4 = _fa4() if _ACTIVE["kernel"] == "fa4" else None
    if cu is None or attention_mask is not None or dropout:
        if fa4 is not None and FA4_FIXED_ROWS and cu is None and attention_mask is None and not dropout:
            out, _ = fa4[1](
                *(t.transpose(1, 2) for t in (query, key, value)), softmax_scale=scale, causal=True
            )
            return out, None
        # transformers loads after privacy_environment(): one-shot commands import this module first
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    max_len = int(kwargs["max_length_q"])
    if fa4 is not None:  # key/value heads as they are; its own autograd function
        out, _ = fa4[0](
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
            softmax_scale=scale, causal=True,
        )  # fmt: skip
        return out.view(batch, length, heads, dim), None
    as_is = flash_varlen_kv_as_is(q.device, q.dtype, dim, heads, k.shape[1])
    if as_is is None:
        out = reference_varlen(q, k, v, cu, scale)
    else:
        if not as_is:
            k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
        out = _FlashVarlen.apply(q, k, v, cu, max_len, scale)
    return out.view(batch, length, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface  # after privacy_environment(), as above

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, varlen_attention_forward)


def _configs(model: Any) -> list[Any]:
    cached = model.__dict__.get("_engine_attn_configs")
    if cached is not None:
        return cached
    seen: list[Any] = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not s for s in seen):
            seen.append(cfg)
    model.__dict__["_engine_attn_configs"] = seen  # walked once: a 7B model has thousands of modules
    return seen


@contextlib.contextmanager
def varlen_attention(model: Any) -> Iterator[None]:
    """Within the block, the model's attention is ``engine_varlen`` through the model's kernel
    (``VARLEN_FLAG``; restored afterwards)."""
    register()
    configs = _configs(model)
    before = [c._attn_implementation for c in configs]
    kernel_before = _ACTIVE["kernel"]
    flag = model.__dict__.get(VARLEN_FLAG)
    _ACTIVE["kernel"] = flag if isinstance(flag, str) else "torch"
    for c in configs:
        c._attn_implementation = NAME
    try:
        yield
    finally:
        _ACTIVE["kernel"] = kernel_before
        for c, b in zip(configs, before, strict=True):
            c._attn_implementation = b
