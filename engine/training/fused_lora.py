"""Fused LoRA linear layers: base matmul and adapter in one autograd node.

peft's LoRA forward on a 4-bit base is several Python calls and kernels per projection: the base
layer (bitsandbytes' dequantize-then-matmul), a defensive clone, a cast of the input, ``lora_A``,
``lora_B``, a multiply by the scale and an add, each with its own saved tensors. With 7 projections
per layer, run in forward, recompute and backward, that is ~500 wrapped calls per step of a small
model, and the per-call overhead is most of the step.

``LoraLinear`` does the same maths as one node:

    out = x @ W^T (+ bias);  xa = x @ A^T;  out += scale * xa @ B^T       (``addmm_``, in place)

and in backward (W frozen, re-dequantized rather than kept):

    g_xa = scale * g @ B;  dB = scale * g^T @ xa;  dA = g_xa^T @ x;  dx = g @ W + g_xa @ A

It saves only ``x`` and the rank-r ``xa``. The NF4 weight is dequantized into one buffer per shape
that every layer reuses (stream-ordered, so reuse is safe), and the LoRA weights are cast to the
compute dtype once per optimizer step (cached by the parameter's version counter), not per call.
The fp32 LoRA parameters stay the optimizer's master weights; their gradients come back in fp32.

Only plain LoRA is fused (one active adapter, no dropout, no DoRA or other variant, frozen bias);
any other layer keeps peft's own forward. ``fuse_lora_layers`` reports what it patched.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_DEQUANT_BUFFERS: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
# Bumped after every optimizer step (engine.training.fast_step). The parameter's own version counter
# is not enough: torch's fused AdamW updates parameters in place without bumping it.
_GENERATION = [0]


def weights_updated() -> None:
    """Call after the LoRA weights changed in place (an optimizer step): the cast copies are stale."""
    _GENERATION[0] += 1


def _is_4bit(base: Any) -> bool:
    return type(base).__name__ == "Linear4bit"  # its weight may be FSDP's plain gathered tensor


def base_weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight [out, in] in ``dtype`` (NF4 dequantized into a shared buffer)."""
    w = base.weight
    if _is_4bit(base):
        import bitsandbytes.functional as bnbf  # only for NF4 weights (bitsandbytes may be absent)

        state = getattr(w, "quant_state", None)
        state = base.quant_state if state is None else state  # FSDP's gathered weight lost it
        # the CPU backend takes no out= buffer, and compiled code (torch.compile) plans its own memory
        if w.device.type != "cuda" or torch.compiler.is_compiling():
            out = bnbf.dequantize_4bit(w.data, state)
        else:
            key = (tuple(state.shape), state.dtype, w.device)
            buf = _DEQUANT_BUFFERS.get(key)
            if buf is None:
                buf = _DEQUANT_BUFFERS[key] = torch.empty(key[0], dtype=state.dtype, device=w.device)
            out = bnbf.dequantize_4bit(w.data, state, out=buf)
        return out if out.dtype == dtype else out.to(dtype)
    return w if w.dtype == dtype else w.to(dtype)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _cached_cast(module: Any, name: str, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``p`` in ``dtype``, cast once per optimizer step (and again if ``p`` was written in place).

    Compiled code (torch.compile) casts every call: the cast joins its graph, and a cache keyed on
    the step would make torch.compile recompile every step. So does code captured into a CUDA graph
    (engine.training.cuda_graphs): the replayed cast reads the weights as they are at each replay."""
    if p.dtype == dtype or torch.compiler.is_compiling() or _capturing(p):
        return p.detach().to(dtype)
    cache = module.__dict__.setdefault("_fused_lora_cache", {})
    key = (_GENERATION[0], p._version)
    hit = cache.get(name)
    if hit is not None and hit[0] == key and hit[1].dtype == dtype:
        return hit[1]
    cast = p.detach().to(dtype)
    cache[name] = (key, cast)
    return cast


def lora_forward(
    x2: torch.Tensor, base: Any, a_c: torch.Tensor, b_c: torch.Tensor, scale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2 @ W^T (+ bias) + scale * (x2 @ A^T) @ B^T`` for rows ``x2`` [N, in] in ``dtype``, and ``x2 @ A^T``
    (what the backward pass needs besides ``x2``)."""
    w = base_weight(base, dtype)
    bias = base.bias
    out = torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else torch.mm(x2, w.t())
    xa = torch.mm(x2, a_c.t())
    out.addmm_(xa, b_c.t(), alpha=scale)
    return out, xa


def lora_backward(
    g: torch.Tensor, x2: torch.Tensor | None, xa: torch.Tensor, a_c: torch.Tensor, b_c: torch.Tensor,
    base: Any, scale: float, want_input: bool,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:  # fmt: skip
    """For the incoming ``g`` [N, out] (in the compute dtype): the gradients of the input (if ``want_input``),
    of ``A`` and of ``B``. ``x2`` is the input rows, or None when the caller computes ``A``'s gradient itself
    (it is ``g_xa^T @ x2``, with ``g_xa`` = ``scale * g @ B``: returned in its place)."""
    g_xa = torch.mm(g, b_c).mul_(scale)  # [N, r]
    grad_b = torch.mm(g.t(), xa).mul_(scale)  # [out, r]
    grad_a = torch.mm(g_xa.t(), x2) if x2 is not None else g_xa  # [r, in]
    grad_x = None
    if want_input:
        grad_x = torch.mm(g, base_weight(base, g.dtype))
        grad_x.addmm_(g_xa, a_c)
    return grad_x, grad_a, grad_b


class LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        a_c: torch.Tensor,
        b_c: torch.Tensor,
        base: Any,
        scale: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            if x2.dtype != dtype:
                x2 = x2.to(dtype)
            out, xa = lora_forward(x2, base, a_c, b_c, scale, dtype)
        ctx.save_for_backward(x2, xa, a_c, b_c)
        ctx.base, ctx.scale, ctx.dtype = base, scale, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, xa, a_c, b_c = ctx.saved_tensors
        with torch.autocast(device_type=grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1])
            if g.dtype != ctx.dtype:
                g = g.to(ctx.dtype)
            grad_x, grad_a, grad_b = lora_backward(
                g, x2, xa, a_c, b_c, ctx.base, ctx.scale, ctx.needs_input_grad[0]
            )
            if grad_x is not None:
                grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_a.to(ctx.a_dtype), grad_b.to(ctx.b_dtype), None, None, None, None, None


def _fusable(layer: Any) -> str | None:
    """Why ``layer`` (a peft LoRA layer) cannot be fused, or None when it can."""
    active = list(getattr(layer, "active_adapters", []))
    if len(active) != 1:
        return "several active adapters"
    name = active[0]
    if name not in layer.lora_A or getattr(layer, "merged", False):
        return "adapter merged or absent"
    if name in getattr(layer, "lora_variant", {}):
        return "a LoRA variant (DoRA and the like)"
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return "LoRA dropout"
    base = layer.get_base_layer()
    if not (isinstance(base, torch.nn.Linear) or _is_4bit(base)):
        return f"base layer {type(base).__name__}"
    if getattr(base, "bias", None) is not None and base.bias.requires_grad:
        return "trainable bias"
    if base.weight.requires_grad:
        return "trainable base weight"
    return None


def lora_operands(layer: Any, x: torch.Tensor) -> tuple[Any, ...]:
    """What ``LoraLinearFn`` takes besides its input, for a fused ``layer`` called on ``x``: the LoRA
    weights, their cast copies, the base layer, the scale and the compute dtype."""
    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    base = layer.get_base_layer()
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    elif _is_4bit(base):
        dtype = base.compute_dtype or x.dtype
    else:
        dtype = base.weight.dtype
    a_c = _cached_cast(layer, "a", lora_a, dtype)
    b_c = _cached_cast(layer, "b", lora_b, dtype)
    return lora_a, lora_b, a_c, b_c, base, float(layer.scaling[name]), dtype


def runs_fused(layer: Any) -> bool:
    """Whether a call of ``layer`` now takes the fused maths: it has the fused forward and its adapter is
    on and unmerged (a disabled adapter, as for DPO's reference pass, takes peft's forward)."""
    fused = getattr(layer.__dict__.get("forward"), "__func__", None) is _fused_forward
    return fused and not layer.disable_adapters and not layer.merged


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if self.disable_adapters or self.merged or args or kwargs:  # anything unusual: peft's own forward
        return type(self).forward(self, x, *args, **kwargs)
    return LoraLinearFn.apply(x, *lora_operands(self, x))


def fuse_lora_layers(model: Any) -> tuple[int, dict[str, int]]:
    """Give every fusable peft LoRA layer of ``model`` the fused forward.

    Returns (layers fused, {reason: count} for layers left on peft's forward).
    """
    try:  # peft after privacy_environment(): one-shot commands import this module first
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0, {}
    fused = 0
    skipped: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        why = _fusable(module)
        if why is not None:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        module.forward = types.MethodType(_fused_forward, module)  # type: ignore[attr-defined]
        fused += 1
    return fused, skipped


def all_lora_fused(model: Any) -> bool:
    """Whether every peft LoRA layer of ``model`` has the fused forward (and there is at least one)."""
    from peft.tuners.lora import LoraLayer  # after privacy_environment(), as above

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(
        getattr(m.__dict__.get("forward"), "__func__", None) is _fused_forward for m in layers
    )


def unfuse_lora_layers(model: Any) -> None:
    """Back to peft's own forward everywhere (used by tests and before merging adapters)."""
    for module in model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _fused_forward:
            del module.forward


def config_has_dropout(config: Any) -> bool:
    """Whether a model config sets any dropout probability above zero (``attention_dropout``,
    ``hidden_dropout``, GPT-2-style ``resid_pdrop``, ...)."""
    values = config.to_dict().items() if hasattr(config, "to_dict") else vars(config).items()
    return any(
        ("dropout" in k or k.endswith("pdrop"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v > 0
        for k, v in values
    )
