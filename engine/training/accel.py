"""Optional accelerators and precision choices, in one place.

Nothing here is required: each speed-up is used only when its library imports and a CUDA GPU is
present, and the run reports which ones it took (``apply_speedups`` returns their names).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.contract.spec import LoraSettings
from engine.planning.memory import LIGER_PATCHES, liger_kernels_apply


def autocast_dtype(device: str) -> torch.dtype | None:
    """bf16 autocast on GPUs that have it (fp16 otherwise); none on the CPU, which trains in fp32."""
    if not device.startswith("cuda"):
        return None
    index = torch.device(device).index or 0
    return (
        torch.bfloat16
        if torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(index)[0] >= 8
        else torch.float16
    )


def apply_speedups(model: Any, device: str, info: dict[str, Any]) -> list[str]:
    """Patch the loaded model's modules with fused kernels where that is safe. Returns what was applied."""
    applied: list[str] = []
    family = getattr(model.config, "model_type", "")
    if info.get("path") == "unsloth" or not liger_kernels_apply(family, device):
        return applied
    from liger_kernel import transformers as liger  # optional extras: loaded where they apply

    patch = getattr(liger, LIGER_PATCHES[family], None)
    if patch is None:
        return applied
    # Patch the instance (model=...) so other models in this process are untouched. The loss stays ours.
    patch(
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
    )
    applied.append(f"liger-kernel ({family}: RoPE, RMSNorm, SwiGLU)")
    return applied


def unsloth_add_lora(model: Any, lora: LoraSettings, *, gradient_checkpointing: bool) -> Any:
    """LoRA through Unsloth's own wrapper, which installs its fused LoRA kernels."""
    from unsloth import FastLanguageModel  # optional extra

    targets = (
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        if lora.target_modules == "all-linear"
        else lora.target_modules
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
    )
