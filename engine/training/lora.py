"""The model a recipe trains (base model, speed-ups, a fresh LoRA adapter), and saving the adapter."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from engine.contract.events import EventWriter
from engine.contract.files import write_dir_atomically
from engine.contract.spec import LoraSettings
from engine.models.adapters import initial_adapter
from engine.training import accel
from engine.training.backend import apply_fast_path, backend_name, backend_reason
from engine.training.base_model import load_for_training
from engine.training.fused_lora import config_has_dropout
from engine.training.loss import causal_lm
from engine.training.offload import offload_checkpointed_inputs


def add_lora(
    model: Any,
    lora: LoraSettings,
    *,
    gradient_checkpointing: bool,
    loaded_info: dict[str, Any],
    offload_activations: bool = False,
    init_adapter: Path | None = None,
) -> Any:
    """Wrap the base model with a fresh LoRA adapter (peft, or Unsloth's path when it loaded the model), or
    with ``init_adapter``'s, trainable (its own rank and target modules then; ``lora`` is not used).

    ``offload_activations`` (with checkpointing): the checkpointed layer inputs wait in host memory
    (engine.training.offload).
    """
    if loaded_info.get("path") == "unsloth":  # Unsloth sets up its own (offloaded) checkpointing
        if init_adapter is not None:
            raise ValueError(
                "init_adapter is loaded by the native backend: set train.backend to 'native' or 'auto'"
            )
        return accel.unsloth_add_lora(model, lora, gradient_checkpointing=gradient_checkpointing)
    if gradient_checkpointing:
        # Recomputation must redraw the same dropout masks only where there is dropout; without it,
        # not saving and restoring the RNG state saves host work and lets CUDA graphs capture the step.
        enable_activation_checkpointing(
            model, preserve_rng_state=lora.dropout > 0 or config_has_dropout(model.config)
        )
        if offload_activations:
            offload_checkpointed_inputs(model)
    model.config.use_cache = False
    if init_adapter is not None:
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha if lora.alpha is not None else 2 * lora.rank,  # type: ignore[arg-type]  # peft says int; a float alpha scales the same
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` property of current transformers models
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def enable_activation_checkpointing(model: Any, *, preserve_rng_state: bool = True) -> None:
    """Recompute each layer in the backward pass (non-reentrant: works with frozen inputs and LoRA).

    transformers renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns that it goes away in v6); older releases have only the old name.
    """
    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def switch_on_recomputation(model: Any) -> bool:
    """Turn gradient checkpointing on in a model that trains without it (the first answer to a CUDA
    out-of-memory error when the defaults had skipped recomputation); False where it cannot be done
    here (no checkpointing layers, layers compiled around their own checkpoint call) or already on."""
    lm = causal_lm(model)
    layers = [m for m in lm.modules() if hasattr(m, "gradient_checkpointing")]
    if not layers or any("forward" in m.__dict__ for m in layers):  # (backend.compile_decoder_layers)
        return False
    if all(m.gradient_checkpointing for m in layers):  # (a series' earlier run switched it on)
        return False
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    enable_activation_checkpointing(lm, preserve_rng_state=dropout or config_has_dropout(lm.config))
    return True


def load_lora_model(
    spec: Any,
    device: str,
    gradient_checkpointing: bool,
    events: EventWriter,
    offload_activations: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The spec's base model with the speed-ups that apply and a fresh LoRA adapter (or ``init_adapter``'s,
    trainable); also how it loaded.

    The LoRA initialisation is seeded with the spec's seed, so a run is reproducible.
    """
    events.stage("loading_model", model=spec.model)
    loaded = load_for_training(spec, device)
    events.log(
        f"model loaded: {loaded.summary()}",
        **{k: v for k, v in loaded.info.items() if isinstance(v, (str, int, float, bool))},
    )
    speedups = accel.apply_speedups(loaded.model, device, loaded.info)
    if speedups:
        events.log(f"speed-ups: {', '.join(speedups)}", speedups=speedups)
    torch.manual_seed(spec.train.seed)
    init = initial_adapter(spec.init_adapter) if getattr(spec, "init_adapter", None) else None
    model = add_lora(
        loaded.model,
        spec.lora,
        gradient_checkpointing=gradient_checkpointing,
        loaded_info=loaded.info,
        offload_activations=offload_activations and device.startswith("cuda"),
        init_adapter=init,
    )
    if init is not None:
        config = model.peft_config["default"]
        events.log(
            f"LoRA from init_adapter {init} (rank {config.r}, alpha {config.lora_alpha}, its target modules)",
            init_adapter=str(init),
            lora_rank=config.r,
        )
    fast = apply_fast_path(model, device, loaded.info, compile_layers=spec.train.compile)
    events.log(
        f"backend: {backend_name(loaded.info)} ({backend_reason(spec, loaded.info)})"
        + (f"; fast path: {', '.join(fast)}" if fast else ""),
        backend=backend_name(loaded.info),
        fast_path=fast,
    )
    return model, loaded.info


def save_adapter(model: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write a standard PEFT adapter folder (with the tokenizer) atomically."""

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return write_dir_atomically(out_dir, write)
