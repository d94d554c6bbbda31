"""Merge a LoRA adapter into base weights, one tensor at a time.

The adapter is small (megabytes), so it is read whole; the base is never loaded as a model.
The converter streams base tensors shard by shard and asks ``LoraMerger.apply`` for the merged
tensor, so merging costs one extra matmul per adapted weight and no extra pass over the disk.
The delta is computed in fp32 and added to the base in fp32 (never into 4-bit weights: a QLoRA
job's base is read here from its original 16-bit files), which is what ``peft``'s
``merge_and_unload`` does for a 16-bit or fp32 model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.adapters import ADAPTER_WEIGHTS, AdapterError, read_adapter, split_lora_state

_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraPair:
    a: torch.Tensor  # (r, in_features)
    b: torch.Tensor  # (out_features, r)
    scale: float
    bias: torch.Tensor | None = None  # lora_bias=True adapters train a bias on B


@dataclass
class LoraMerger:
    """The adapter's deltas keyed by the base checkpoint's tensor names."""

    pairs: dict[str, LoraPair]  # "model.layers.0.self_attn.q_proj.weight" -> pair
    replacements: dict[str, torch.Tensor]  # modules_to_save: full tensors that replace the base's
    alpha: float
    rank: int
    adapter_dir: Path
    base_model: str | None
    used: set[str] = field(default_factory=set)

    @property
    def target_names(self) -> set[str]:
        names = set(self.pairs) | set(self.replacements)
        names |= {n[: -len(".weight")] + ".bias" for n, p in self.pairs.items() if p.bias is not None}
        return names

    def delta(self, name: str) -> torch.Tensor | None:
        """``scale * B @ A`` for the weight ``name`` (fp32), or None if the adapter leaves it alone."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        return (pair.b.float() @ pair.a.float()) * pair.scale

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged value of base tensor ``name`` (fp32 when changed, else the input as is)."""
        if name in self.replacements:
            new = self.replacements[name]
            if tuple(new.shape) != tuple(tensor.shape):
                raise AdapterError(
                    f"the adapter's saved copy of {name} has shape {tuple(new.shape)} but the base has "
                    f"{tuple(tensor.shape)} (was the vocabulary resized?); export from the merged model instead"
                )
            self.used.add(name)
            return new.float()
        if name.endswith(".bias"):
            pair = self.pairs.get(name[: -len(".bias")] + ".weight")
            if pair is not None and pair.bias is not None:
                self.used.add(name)
                return tensor.float() + pair.bias.float() * pair.scale
            return tensor
        pair = self.pairs.get(name)
        if pair is None:
            return tensor
        shape = (pair.b.shape[0], pair.a.shape[1])
        if shape != tuple(tensor.shape):
            raise AdapterError(
                f"LoRA delta for {name} has shape {shape} but the base tensor has {tuple(tensor.shape)}: "
                "the adapter was trained on a different base model"
            )
        self.used.add(name)
        # W + scale * B @ A in one fused fp32 op (no separate delta matrix)
        merged = tensor.to(torch.float32, copy=True)
        merged.addmm_(pair.b.float(), pair.a.float(), alpha=pair.scale)
        return merged

    def check_targets(self, base_names: Iterable[str]) -> None:
        """Every adapted module must exist in the base (a wrong base is an error, not a no-op)."""
        base = set(base_names)
        missing = sorted(n for n in self.target_names if n not in base)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise AdapterError(
                f"the adapter in {self.adapter_dir} changes {len(missing)} tensor(s) that the base model does not "
                f"have ({shown}); pass the base model it was trained on (base_model=...)"
            )

    def check_all_used(self) -> None:
        unused = sorted(self.target_names - self.used)
        if unused:
            raise AdapterError(f"{len(unused)} adapter tensor(s) were never merged (first: {unused[0]})")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # peft matches rank_pattern/alpha_pattern keys as a regex on the end of the module path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def load_lora(adapter_dir: str | Path) -> LoraMerger:
    """Read a PEFT LoRA adapter folder for merging into base weights."""
    adapter_dir = Path(adapter_dir)
    cfg, state = read_adapter(adapter_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"only LoRA adapters can be exported; {adapter_dir} is {cfg.get('peft_type')}")
    if cfg.get("use_dora"):
        raise AdapterError(
            "DoRA adapters are not supported by the streaming merge; merge with peft and export the folder"
        )
    if cfg.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported for GGUF export")
    for key in state:
        if "lora_magnitude_vector" in key or "trainable_tokens" in key or ".lora_embedding_" in key:
            raise AdapterError(
                f"adapter tensor {key} (DoRA, trainable tokens or LoRA on embeddings) is not supported for GGUF export"
            )
    try:
        factors, other, _ = split_lora_state(state)
    except ValueError as exc:
        raise AdapterError(f"{adapter_dir / ADAPTER_WEIGHTS}: {exc}") from None
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", r))
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, LoraPair] = {}
    for prefix, f in factors.items():
        module = prefix.removeprefix(_PEFT_PREFIX)
        mr = int(_pattern_value(cfg.get("rank_pattern") or {}, module, r))
        ma = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
        bias = other.pop(f"{prefix}.lora_B.bias", None)  # lora_bias=True adapters train a bias on B
        pairs[module + ".weight"] = LoraPair(
            a=f.A, b=f.B, scale=ma / (mr**0.5) if rslora else ma / mr, bias=bias
        )
    return LoraMerger(
        pairs=pairs,
        # modules_to_save copies (e.g. a retrained lm_head) replace the base's tensors
        replacements={k.removeprefix(_PEFT_PREFIX): v for k, v in other.items()},
        alpha=alpha,
        rank=r,
        adapter_dir=adapter_dir,
        base_model=cfg.get("base_model_name_or_path"),
    )
