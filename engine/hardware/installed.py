"""Which optional parts of the install are present, and the exact command that adds a missing one.

``pip install backprop-mcp`` (and ``uvx backprop-mcp``) give the server alone: it answers at once
but cannot train. Training needs the ``train`` extra (torch, transformers, peft, ...), GGUF export
the ``export`` extra too. Whoever is about to start work that needs them (a server tool, a CLI
command) asks here first, so the user is told what to install *before* a job folder exists,
instead of meeting ``ModuleNotFoundError: torch`` in a failed job.

Presence is checked with ``importlib.util.find_spec``: nothing is imported, so this costs
microseconds and the server stays torch-free.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any

# The modules each extra's code imports (module name, not distribution name).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"),
    "export": ("gguf", "llama_cpp"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "unsloth": ("unsloth",),
}
# What each kind of work needs: an export merges with torch before it converts.
NEEDS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "export": ("train", "export"),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
    "unsloth": ("unsloth",),
}


class MissingExtra(RuntimeError):
    """Work that needs an optional extra this Python does not have; the message says how to add it."""

    def __init__(self, message: str, extras: list[str], modules: list[str]):
        super().__init__(message)
        self.extras = extras
        self.modules = modules


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken half-install counts as missing
        return False


def missing_modules(extra: str) -> list[str]:
    return [m for m in EXTRA_MODULES[extra] if not _present(m)]


def _from_checkout() -> Path | None:
    """The source checkout this package runs from (an editable install), or None when installed."""
    root = Path(__file__).resolve().parents[2]
    site = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    if root in site or not (root / "pyproject.toml").is_file():
        return None
    return root


def install_command(extras: list[str]) -> str:
    """The command that adds ``extras`` to the Python running now."""
    spec = f"[{','.join(extras)}]"
    checkout = _from_checkout()
    target = f'-e "{checkout}{spec}"' if checkout else f'"backprop-mcp{spec}"'
    return f'"{sys.executable}" -m pip install {target}'


def worker_runs_elsewhere() -> bool:
    """True when jobs run in another Python (``BACKPROP_WORKER_COMMAND``): its packages can't be seen here."""
    return bool(os.environ.get("BACKPROP_WORKER_COMMAND"))


def require(work: str, what: str) -> None:
    """Raise ``MissingExtra`` when ``what`` (e.g. "start_finetune") can't run here for lack of an extra."""
    if worker_runs_elsewhere():
        return
    extras, modules = [], []
    for extra in NEEDS[work]:
        gone = missing_modules(extra)
        if gone:
            extras.append(extra)
            modules += gone
    if not modules:
        return
    message = (
        f"{what} needs the {' and '.join(repr(e) for e in extras)} extra{'s' if len(extras) > 1 else ''}, which this Python "
        f"({sys.executable}) does not have (missing: {', '.join(modules)}). Install it once, then try "
        f"again:\n  {install_command(extras)}"
    )
    if work in ("train", "export"):
        message += (
            "\nor install the server with everything as a uv tool (about 6 GB, once): uv tool install "
            '"backprop-mcp[train,export]", and give your MCP client the command backprop-mcp. '
            "Restart the MCP server afterwards. On a machine without an NVIDIA GPU, install the CPU build of "
            "torch first: pip install torch --index-url https://download.pytorch.org/whl/cpu"
        )
    raise MissingExtra(message, extras, modules)


def require_for_spec(spec: Any, what: str) -> None:
    """``require`` for everything a job spec will use: its kind's extras, ``train.report_to`` and ``train.backend``."""
    require("export" if spec.kind == "export" else "train", what)
    train = getattr(spec, "train", None)
    for name in getattr(train, "report_to", None) or []:
        require(name, f"{what} with report_to {name}")
    if getattr(train, "backend", None) == "unsloth":
        require("unsloth", f"{what} with backend 'unsloth'")
