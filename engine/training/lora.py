"""Adding a LoRA adapter to a base model, and saving it as a standard PEFT folder."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from engine.spec import LoraSettings
from engine.training import accel


def add_lora(
    model: Any, lora: LoraSettings, *, gradient_checkpointing: bool, loaded_info: dict[str, Any]
) -> Any:
    """Wrap the base model with a fresh LoRA adapter (peft, or Unsloth's path when it loaded the model)."""
    if loaded_info.get("path") == "unsloth":  # Unsloth sets up its own (offloaded) checkpointing
        return accel.unsloth_add_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.config.use_cache = False
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` property of current transformers models
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each layer in the backward pass (non-reentrant: works with frozen inputs and LoRA).

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns that it goes away in v6); older releases have only the old name.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def save_adapter(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write a standard PEFT adapter folder atomically (temporary folder, then rename)."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
