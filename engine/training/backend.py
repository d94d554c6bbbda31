"""Which training backend a run takes, and the native fast path's set-up.

``train.backend`` (engine.spec.TrainSettings):
- ``native``: the engine's own path (transformers + peft + bitsandbytes, with the fast path below);
- ``unsloth``: Unsloth's FastLanguageModel (an error when it cannot be used here);
- ``auto``: Unsloth where it is installed and usable (measured faster, see ``_AUTO_RULE``), else
  native.

The native fast path (GPU only): peft's LoRA layers get the fused forward
(engine.training.fused_lora), and packed rows use the varlen flash-attention kernel
(engine.training.varlen_attention) when torch has it for the model's dtype and head size. The step
itself (engine.training.fast_step) is the same on every device.
"""

from __future__ import annotations

from typing import Any

from engine.training.fast_step import VARLEN_FLAG
from engine.training.fused_lora import fuse_lora_layers
from engine.training.varlen_attention import flash_varlen_available

# auto: on one H200 (benchmarks/RESULTS.md, 2026-12-02) Unsloth was faster than the native fast path
# in every configuration measured (7B NF4 micro-batch 4: 1.05x, with 0.90x the memory; 0.5B: ~1.7x,
# on another day's run), so auto takes Unsloth wherever it imports on a CUDA GPU, and the native
# fast path everywhere else.
_AUTO_RULE = "Unsloth where it imports on a CUDA GPU (measured faster), else native"


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


def apply_fast_path(model: Any, device: str, info: dict[str, Any]) -> list[str]:
    """Switch on the native fast path for a peft-wrapped model on a GPU. Returns what was applied."""
    if backend_name(info) != "native" or not device.startswith("cuda"):
        return []
    applied = []
    fused, skipped = fuse_lora_layers(model)
    if fused:
        note = f"fused LoRA on {fused} layers"
        if skipped:
            note += (
                " (peft's forward kept for "
                + ", ".join(f"{n} with {why}" for why, n in skipped.items())
                + ")"
            )
        applied.append(note)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    import torch

    # the dtype attention runs in: the compute dtype of a 4-bit/16-bit load (fp32 never takes flash)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(info.get("compute_dtype")))
    if dtype is not None and flash_varlen_available(device, dtype, head_dim):
        model.__dict__[VARLEN_FLAG] = True
        applied.append("varlen flash attention for packed rows")
    return applied
