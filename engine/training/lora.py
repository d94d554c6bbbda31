"""Adding a LoRA adapter to a base model, and saving it as a standard PEFT folder."""

from __future__ import annotations

import shutil
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    return get_peft_model(model, config)


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
