"""Refusing a tool call, before anything is created, when the install lacks the extra it needs.

The check itself (``engine.extras``) imports nothing heavy: ``find_spec`` only, so the server stays
torch-free and fast to start. Jobs started through ``BACKPROP_WORKER_COMMAND`` run in another
Python whose packages can't be seen from here; then nothing is refused.
"""

from __future__ import annotations

from mcp.server.mcpserver.exceptions import ToolError

from engine.extras import MissingExtra
from engine.extras import require as _require


def require(work: str, tool: str) -> None:
    """Raise ``ToolError`` naming the install command when ``tool`` can't do ``work`` ("train", "export")."""
    try:
        _require(work, tool)
    except MissingExtra as exc:
        raise ToolError(str(exc)) from None
