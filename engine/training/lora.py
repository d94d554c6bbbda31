"""The model a recipe trains (base model, speed-ups, a fresh LoRA adapter), and saving the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.events import EventWriter
from engine.files import write_dir_atomically
from engine.spec import LoraSettings
from engine.training import accel
from engine.training.base_model import load_for_training


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


def load_lora_model(
    spec: Any, device: str, gradient_checkpointing: bool, events: EventWriter
) -> tuple[Any, dict[str, Any]]:
    """The spec's base model with the speed-ups that apply and a fresh LoRA adapter; also how it loaded.

    The LoRA initialisation is seeded with the spec's seed, so a run is reproducible.
    """
    import torch

    events.stage("loading_model", model=spec.model)
    loaded = load_for_training(spec, device)
    events.log(
        f"model loaded: {loaded.info}",
        **{k: v for k, v in loaded.info.items() if isinstance(v, (str, int, float, bool))},
    )
    speedups = accel.apply_speedups(loaded.model, device, loaded.info)
    if speedups:
        events.log(f"speed-ups: {', '.join(speedups)}", speedups=speedups)
    torch.manual_seed(spec.train.seed)
    model = add_lora(
        loaded.model, spec.lora, gradient_checkpointing=gradient_checkpointing, loaded_info=loaded.info
    )
    return model, loaded.info


def save_adapter(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write a standard PEFT adapter folder (with the tokenizer) atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, write)
