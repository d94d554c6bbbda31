"""Resumable training checkpoints, written atomically.

A checkpoint is a folder ``step-000120`` holding the adapter weights (only the trainable LoRA
tensors), the optimizer and scheduler states, the RNG states and a small ``state.json``. It is
written beside its final place and renamed into it, so a worker killed mid-write leaves the
previous checkpoint intact; the last ``keep`` are kept. Written on a thread while training goes on
(``CheckpointWriter``).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from engine.contract.files import write_dir_atomically

STATE = "state.json"


class CheckpointWriter:
    """Saves a run's checkpoints in the background, one at a time.

    ``save`` copies what a checkpoint holds to host memory at once (the optimizer changes its tensors
    in place at the next step) and writes the files on a thread while training goes on; the loop waits
    only for the copy. ``finished`` / ``wait`` give back a written checkpoint's (step, folder) once, for its
    event, and raise a failed write's error. The thread is not a daemon: a job that fails or is cancelled
    while a checkpoint is being written still finishes writing it before the process exits.
    """

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root, keep
        self._thread: threading.Thread | None = None
        self._result: tuple[int, Path] | BaseException | None = None

    def save(self, step: int, model: Any, optimizer: Any, scheduler: Any, extra: dict[str, Any]) -> None:
        """Start writing the checkpoint of ``step`` (after the one before it is written)."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint is still being written: take it with wait() first")
        state = _host_copy(model, optimizer, scheduler, {"step": step, **extra})
        self._thread = threading.Thread(target=self._write, args=(step, state), name=f"checkpoint-{step}")
        self._thread.start()

    def finished(self) -> tuple[int, Path] | None:
        """The checkpoint written since the last call, if its write is over (without waiting)."""
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> tuple[int, Path] | None:
        """Wait for the write in progress; its (step, folder), or None when none was being written."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        if isinstance(result, BaseException):
            raise result
        return result

    def _write(self, step: int, state: dict[str, Any]) -> None:
        try:
            self._result = step, _write_checkpoint(self.root, step, state, self.keep)
        except BaseException as e:  # handed to the training thread by wait()
            self._result = e


def _host_copy(model: Any, optimizer: Any, scheduler: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Everything a checkpoint holds, copied off the device (and off the live tensors on the CPU)."""

    def copy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, list):
            return [copy(v) for v in value]
        return value

    return {
        "weights": {k: copy(v).contiguous() for k, v in get_peft_model_state_dict(model).items()},
        "trainer": {
            "optimizer": copy(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        "info": json.loads(json.dumps(info)),  # the loss history goes on growing: a copy
    }


def _write_checkpoint(root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    def write(tmp: Path) -> None:
        save_file(state["weights"], str(tmp / "adapter.safetensors"))
        torch.save(state["trainer"], tmp / "trainer_state.pt")
        (tmp / STATE).write_text(json.dumps(state["info"], indent=2))

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
