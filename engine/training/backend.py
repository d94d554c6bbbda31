"""Which training backend a run takes (``train.backend``: native, unsloth, or auto by ``_AUTO_RULE``),
and the native fast path's set-up on a GPU: peft's LoRA layers get the fused forward
(engine.training.fused_lora), packed rows the varlen flash-attention kernel where the model's dtype
and head size allow it (engine.training.varlen_attention), and with ``train.compile`` each decoder
layer is compiled. The step itself (engine.training.fast_step) is the same on every device.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from engine.training.fused_lora import fuse_lora_layers
from engine.training.fused_mlp import fuse_gated_mlps
from engine.training.loss import compile_workers
from engine.training.varlen_attention import VARLEN_FLAG, kernel_description, varlen_kernel

# The native fast path with its defaults (CUDA graphs, no recomputation where the card holds every layer's
# activations, the compiled loss kernel) measured as fast as Unsloth or faster at every size (CHANGELOG.md);
# without CUDA graphs a small model's eager native step is host-bound and slower.
_AUTO_RULE = (
    "native while train.cuda_graphs is on (measured at least as fast as Unsloth at 0.5B and 7B), else "
    "Unsloth where it imports on a CUDA GPU, else native"
)


def auto_prefers_native(spec: Any) -> str | None:
    """Why ``backend: auto`` takes the native path for this job even where Unsloth is usable, or None."""
    train = getattr(spec, "train", None)
    if getattr(train, "backend", "auto") != "auto" or not getattr(train, "cuda_graphs", False):
        return None
    return "the native fast path with CUDA graphs (measured ahead of Unsloth at 0.5B and 7B, or level)"


def unsloth_mode(spec: Any) -> str:
    """The base-model loader's Unsloth mode ("never" | "auto" | "require") that ``train.backend`` implies."""
    backend = getattr(getattr(spec, "train", None), "backend", "auto")
    return {"native": "never", "unsloth": "require"}.get(backend, "auto")


def backend_name(info: dict[str, Any]) -> str:
    return "unsloth" if info.get("path") == "unsloth" else "native"


def backend_reason(spec: Any, info: dict[str, Any]) -> str:
    """Why the run took its backend, in words for the run's log."""
    asked = getattr(getattr(spec, "train", None), "backend", "auto")
    if backend_name(info) == "unsloth" or asked == "unsloth":
        return f"backend '{asked}': {info.get('path_reason')}"
    if asked == "native":
        return "backend 'native' asked for"
    return f"backend 'auto': {_AUTO_RULE}; here: {info.get('path_reason')}"


def _layer_forward(layer: Any, *args: Any, **kwargs: Any) -> Any:
    return type(layer).forward(layer, *args, **kwargs)


def _compiled_layer_call(layer: Any, compiled: Any, checkpoint: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # evaluation and generation stay eager: no compiling for them
        return _layer_forward(layer, *args, **kwargs)
    if checkpoint is not None and layer.training:  # checkpoint outside, compiled code inside
        return checkpoint(compiled, layer, *args, **kwargs)
    return compiled(layer, *args, **kwargs)


def compile_decoder_layers(model: Any) -> int:
    """Compile every decoder layer's forward with torch.compile (one compiled function shared by all
    layers: torch inlines the module, so layers of one shape share its graphs). Returns how many.

    transformers checkpoints a layer either around its ``__call__`` (5.17) or inside its ``forward``
    (later releases); here the layer's checkpoint function (non-reentrant, engine.training.lora) is
    called around the compiled call instead, so every version runs the same thing and the backward
    pass's recompute re-runs the compiled code. ``dynamic=None``: fixed-length rows compile once;
    when a shape changes (packed rows' ``cu_seqlens``, their longest example) torch recompiles once
    with that size symbolic, not on every step.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer  # after privacy_environment()

    compile_workers(pool=True)  # hundreds of kernels: inductor's worker pool pays for itself here
    compiled = torch.compile(_layer_forward, fullgraph=False, dynamic=None)
    n = 0
    for m in model.modules():
        if isinstance(m, GradientCheckpointingLayer):
            checkpoint = m._gradient_checkpointing_func if m.gradient_checkpointing else None
            m.gradient_checkpointing = False
            m.forward = functools.partial(_compiled_layer_call, m, compiled, checkpoint)
            n += 1
    return n


def uncompile_decoder_layers(model: Any) -> int:
    """Undo ``compile_decoder_layers``: each layer's own forward and checkpointing again (benchmarks
    compare compiled and eager layers on one loaded model). Returns how many layers changed."""
    n = 0
    for m in model.modules():
        call = m.__dict__.get("forward")
        if isinstance(call, functools.partial) and call.func is _compiled_layer_call:
            del m.forward
            m.gradient_checkpointing = call.args[2] is not None
            n += 1
    return n


def apply_fast_path(model: Any, device: str, info: dict[str, Any], compile_layers: bool = False) -> list[str]:
    """Switch on the native fast path for a peft-wrapped model on a GPU. Returns what was applied."""
    if backend_name(info) != "native" or not device.startswith("cuda"):
        return []
    applied = []
    fused, skipped = fuse_lora_layers(model)
    if fused:
        kept = ", ".join(f"{n} with {why}" for why, n in skipped.items())
        applied.append(
            f"fused LoRA on {fused} layers" + (f" (peft's forward kept for {kept})" if kept else "")
        )
    # (not under torch.compile'd layers: that pairing, and Liger's kernels traced inside it, is unmeasured)
    if not compile_layers and (mlps := fuse_gated_mlps(model)):
        applied.append(f"the MLP's activation inside its down projection on {mlps} layers")
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    # the dtype attention runs in: the compute dtype of a 4-bit/16-bit load (fp32 never takes flash)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(info.get("compute_dtype")))
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    if dtype is not None and (kernel := varlen_kernel(device, dtype, head_dim, heads, kv_heads)) is not None:
        model.__dict__[VARLEN_FLAG] = kernel
        applied.append(f"packed rows' attention: {kernel_description(kernel)}")
    if compile_layers:
        applied.append(f"torch.compile on {compile_decoder_layers(model)} decoder layers")
    return applied
