"""The PEFT LoRA adapter folder, in one place: recognising and reading it, and moving LoRA
factors between state dicts, folders and a live peft model.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors``. Factors are handled as
``dict[module_key, LoraFactors]`` where ``module_key`` is the state-dict prefix before
``.lora_A`` (e.g. ``base_model.model.model.layers.0.self_attn.q_proj``); both the saved form
(``...lora_A.weight``) and the in-model form (``...lora_A.default.weight``) are understood.

torch loads only when tensors are read, so the torch-free catalog can ask ``is_adapter_folder``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message says why and what to do."""


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def initial_adapter(path: str | Path) -> Path:
    """The adapter folder a job starts from (``init_adapter``): a PEFT adapter folder, or a succeeded
    training job's folder (its adapter; the front-ends turn a job's id into its folder). Raises AdapterError,
    its message starting "init_adapter: ", saying what was given and what to give."""
    from engine.contract.files import PathError, checked_path
    from engine.contract.spec import RESULT_FILE, SPEC_FILE, read_result

    try:
        folder = checked_path(str(path), "init_adapter", expect="dir")
    except PathError as exc:
        raise AdapterError(f"{exc} Give a finished job's id or folder, or a PEFT adapter folder.") from None
    if is_adapter_folder(folder):
        return folder
    if (folder / SPEC_FILE).is_file():
        result = read_result(folder)
        if result is None:
            raise AdapterError(
                f"init_adapter: job {folder.name} has not finished ({RESULT_FILE} is missing); wait for it to end"
            )
        adapter = result.artifacts.get("adapter")
        if result.status != "succeeded" or not adapter or not is_adapter_folder(adapter):
            raise AdapterError(
                f"init_adapter: job {folder.name} ended {result.status} without an adapter to start from"
            )
        return Path(adapter)
    raise AdapterError(
        f"init_adapter: {folder} is neither a PEFT adapter folder ({ADAPTER_CONFIG}) nor a finished job's folder "
        f"({SPEC_FILE})"
    )


def trained_rank(init_adapter: str | None, rank: int) -> int:
    """The LoRA rank a job trains: its ``init_adapter``'s where it starts from one, else ``rank``."""
    return int(read_adapter_config(initial_adapter(init_adapter))["r"]) if init_adapter else rank


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    if not is_adapter_folder(folder):
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder")
    config: dict[str, Any] = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, state dict) of a PEFT adapter folder."""
    from safetensors.torch import load_file  # torch and peft load where used: the server imports this module

    config = read_adapter_config(folder)
    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (save the adapter with safe_serialization)")
    return config, load_file(str(weights))


@dataclass
class LoraFactors:
    """One target module's LoRA factors: A is r×n (in-features), B is m×r (out-features)."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        """B·A in float32 (without the scaling s)."""
        return self.B.float() @ self.A.float()


Adapter = dict[str, LoraFactors]


def split_lora_key(key: str) -> tuple[str, str, str] | None:
    """``prefix.lora_A[.adapter].weight`` -> (prefix, "A", the key after the prefix); None otherwise."""
    for which in ("A", "B"):
        pos = key.find(f".lora_{which}.")
        if pos >= 0 and key.endswith(".weight"):
            return key[:pos], which, key[pos + 1 :]
    return None


def split_lora_state(state: Mapping[str, torch.Tensor]) -> tuple[Adapter, dict[str, torch.Tensor], str]:
    """Split a PEFT LoRA state dict into (factors per module, other entries, key style).

    ``key_style`` is the part after the prefix for A (``lora_A.weight`` or
    ``lora_A.default.weight``), so ``join_lora_state`` writes keys back in the same form. Entries
    that are not LoRA A/B (e.g. modules_to_save) come back untouched in ``other``.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {"A": {}, "B": {}}
    other: dict[str, torch.Tensor] = {}
    style = "lora_A.weight"
    for key, value in state.items():
        if "lora_magnitude_vector" in key:
            raise ValueError(f"{key}: DoRA adapters are not supported by SLAO merging; train plain LoRA")
        parts = split_lora_key(key)
        if parts is None:
            other[key] = value
            continue
        prefix, which, suffix = parts
        halves[which][prefix] = value
        if which == "A":
            style = suffix
    a, b = halves["A"], halves["B"]
    if set(a) != set(b):
        raise ValueError(
            f"LoRA state dict has A without B (or B without A) for: {sorted(set(a) ^ set(b))[:5]}"
        )
    if not a:
        raise ValueError("no LoRA weights (keys containing '.lora_A.' / '.lora_B.') in this state dict")
    for prefix, A in a.items():
        B = b[prefix]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{prefix}: expected A r×n and B m×r, got A {tuple(A.shape)} and B {tuple(B.shape)} "
                "(convolutional or embedding LoRA layers are not supported)"
            )
    return {prefix: LoraFactors(A=A, B=b[prefix]) for prefix, A in a.items()}, other, style


def join_lora_state(
    factors: Adapter, other: Mapping[str, torch.Tensor] | None = None, key_style: str = "lora_A.weight"
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_lora_state``."""
    state: dict[str, torch.Tensor] = dict(other or {})
    b_style = key_style.replace("lora_A", "lora_B", 1)
    for prefix, f in factors.items():
        state[f"{prefix}.{key_style}"] = f.A
        state[f"{prefix}.{b_style}"] = f.B
    return state


def clone_adapter(adapter: Adapter) -> Adapter:
    return {k: LoraFactors(A=f.A.detach().clone(), B=f.B.detach().clone()) for k, f in adapter.items()}


def load_factors(folder: str | Path, device: str = "cpu") -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The factors and other state entries of an adapter folder, on ``device``."""
    _, state = read_adapter(folder)
    factors, other, _ = split_lora_state(state)
    moved = {k: LoraFactors(A=f.A.to(device), B=f.B.to(device)) for k, f in factors.items()}
    return moved, {k: v.to(device) for k, v in other.items()}


def read_factors(model: Any) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """A detached copy of a peft model's LoRA factors (saved-form keys)."""
    from peft import get_peft_model_state_dict

    factors, other, _ = split_lora_state(get_peft_model_state_dict(model))
    return clone_adapter(factors), {k: v.detach().clone() for k, v in other.items()}


def write_factors(model: Any, factors: Adapter, other: dict[str, torch.Tensor] | None = None) -> None:
    """Load factors into a peft model's LoRA layers."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, join_lora_state(factors, other))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise RuntimeError(f"adapter weights do not fit the model (unexpected keys, e.g. {unexpected[:3]})")
