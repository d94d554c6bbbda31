"""A gated MLP's activation fused into its down projection's LoRA node, so their product is not kept.

A gated MLP (Llama, Qwen2, Mistral, Qwen3: ``down(silu(gate(x)) * up(x))``) keeps for its backward pass
the gate and up projections' outputs (the activation's inputs, which Liger's SwiGLU keeps too) and, as the
down projection's saved input, their product: three [tokens, intermediate] tensors a layer. Here the
product is made inside the down projection's node (``SiluMulLoraLinearFn``) and made again in its backward
pass, for the down LoRA's ``A`` gradient: two tensors a layer. Without recomputation, where every layer
keeps its own, that is a third of the MLP's share: 1.78 GiB at 0.5B and micro-batch 4 × 2048 (Unsloth's
fused MLP keeps two as well). The cost is one more pass over gate and up in the backward pass.

The maths is the down projection's ``LoraLinearFn`` (engine.training.fused_lora) on ``silu(gate) * up``.
On a CUDA device with liger-kernel installed the activation and its gradient are Liger's SwiGLU kernels
(the ones its patched MLP runs: one pass each, fp32 inside); elsewhere torch's ops compute the same
(the product rounded to the compute dtype as Liger's kernel rounds it).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F

from engine.training.fused_lora import lora_backward, lora_forward, lora_operands, runs_fused


def _liger_swiglu() -> Any:
    try:
        from liger_kernel.ops import swiglu
    except ImportError:  # liger-kernel (the fast extra) not installed, or no Triton
        return None
    return swiglu


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    liger = _liger_swiglu() if gate.is_cuda else None
    if liger is not None:
        return liger.swiglu_forward(gate, up)[2]
    return F.silu(gate) * up


def _silu_mul_grads(
    gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d/d gate and d/d up of ``silu(gate) * up`` for the incoming ``grad``. Liger's kernel writes them over
    ``gate`` and ``up``: only this node holds those (its saved tensors), and it is done with them."""
    liger = _liger_swiglu() if gate.is_cuda else None
    if liger is not None:
        return liger.swiglu_backward(gate, up, grad)
    g32, sig = gate.float(), torch.sigmoid(gate.float())
    silu = g32 * sig
    grad_up = grad.float() * silu
    grad_gate = grad.float() * up.float() * sig * (1 + g32 * (1 - sig))
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


class SiluMulLoraLinearFn(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a LoRA ``down`` on a frozen base: saves gate, up and the rank-sized
    ``xa``, not the product."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        gate: torch.Tensor,
        up: torch.Tensor,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        a_c: torch.Tensor,
        b_c: torch.Tensor,
        base: Any,
        scale: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        with torch.autocast(device_type=gate.device.type, enabled=False):
            # Liger's kernels take rows in place: contiguous, in the compute dtype
            g2 = gate.reshape(-1, gate.shape[-1]).to(dtype).contiguous()
            u2 = up.reshape(-1, up.shape[-1]).to(dtype).contiguous()
            out, xa = lora_forward(_silu_mul(g2, u2), base, a_c, b_c, scale, dtype)
        ctx.save_for_backward(g2, u2, xa, a_c, b_c)
        ctx.base, ctx.scale, ctx.dtype = base, scale, dtype
        ctx.shapes = gate.shape, gate.dtype, up.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        g2, u2, xa, a_c, b_c = ctx.saved_tensors
        shape, gate_dtype, up_dtype = ctx.shapes
        with torch.autocast(device_type=grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1])
            if g.dtype != ctx.dtype:
                g = g.to(ctx.dtype)
            grad_product, g_xa, grad_b = lora_backward(g, None, xa, a_c, b_c, ctx.base, ctx.scale, True)
            assert grad_product is not None
            grad_a = torch.mm(g_xa.t(), _silu_mul(g2, u2))  # [r, intermediate]: the product, made again
            grad_gate, grad_up = _silu_mul_grads(g2, u2, grad_product)
        return (
            grad_gate.view(shape).to(gate_dtype),
            grad_up.view(shape).to(up_dtype),
            grad_a.to(ctx.a_dtype),
            grad_b.to(ctx.b_dtype),
            *(None,) * 5,
        )


# The MLP classes whose forward is ``down(act_fn(gate(x)) * up(x))`` (the families Liger patches too)
GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def _gated_silu(mlp: Any) -> bool:
    """Whether ``mlp`` is ``down(silu(gate(x)) * up(x))`` with a LoRA ``down``."""
    if type(mlp).__name__ not in GATED_MLPS:
        return False
    silu = type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")  # torch's, transformers'
    return silu and hasattr(mlp.down_proj, "lora_A")


def _fused_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not runs_fused(self.down_proj):  # unfused again, its adapter off or merged: the plain maths
        return self.down_proj(self.act_fn(gate) * up)
    return SiluMulLoraLinearFn.apply(gate, up, *lora_operands(self.down_proj, gate))


def fuse_gated_mlps(model: Any) -> int:
    """Give every gated SiLU MLP of ``model`` whose down projection is LoRA the fused activation (it takes
    the fused maths while the down projection has the fused LoRA forward: ``fuse_lora_layers``).
    Returns how many MLPs changed."""
    n = 0
    for module in model.modules():
        if _gated_silu(module) and not _is_fused(module):
            module.__dict__[_OWN_FORWARD] = module.__dict__.get("forward")  # Liger's, bound to the instance
            module.forward = types.MethodType(_fused_mlp_forward, module)
            n += 1
    return n


_OWN_FORWARD = "_forward_before_fused_mlp"


def _is_fused(module: Any) -> bool:
    return getattr(module.__dict__.get("forward"), "__func__", None) is _fused_mlp_forward


def unfuse_gated_mlps(model: Any) -> None:
    """Back to each MLP's forward from before ``fuse_gated_mlps`` (Liger's, where it patched the instance)."""
    for module in model.modules():
        if _is_fused(module):
            own = module.__dict__.pop(_OWN_FORWARD, None)
            if own is None:
                del module.forward
            else:
                module.forward = own
