"""backprop-mcp's engine: fine-tuning, SLAO series and GGUF export.

``import engine`` stays light (no torch): the heavy modules load when first used, so that the
server and ``backprop --help`` can import the torch-free parts (spec, events, data) cheaply.

    from engine import Trainer
    result = Trainer("tiny").train("examples/data/chat.jsonl", steps=30)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Trainer", "__version__"]

if TYPE_CHECKING:
    from engine.api import Trainer


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from engine.api import Trainer

        return Trainer
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
