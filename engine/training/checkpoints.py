"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``step-000120`` holding the adapter weights (only the trainable LoRA
tensors), the optimizer and scheduler states, the RNG states and a small ``state.json``. It is
written beside its final place and renamed into it, so a worker killed mid-write leaves the
previous checkpoint intact; the last ``keep`` are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from engine.contract.files import write_dir_atomically

STATE = "state.json"


def save_checkpoint(
    root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, extra: dict[str, Any], keep: int = 2
) -> Path:
    def write(tmp: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
        save_file(weights, str(tmp / "adapter.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / STATE).write_text(json.dumps({"step": step, **extra}, indent=2))

    final = write_dir_atomically(root / f"step-{step:06d}", write)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).exists())


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; returns ``state.json``."""
    set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors")))
    states = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    torch.set_rng_state(states["rng_cpu"])
    if states.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["rng_cuda"])
    return json.loads((path / STATE).read_text())
