"""Refusing a tool call, before anything is created, when the install lacks the extra it needs.

The check itself (``engine.extras``, through ``engine.interface``) imports nothing heavy: ``find_spec`` only, so the server stays
torch-free and fast to start. Jobs started through ``BACKPROP_WORKER_COMMAND`` run in another
Python whose packages can't be seen from here; then nothing is refused.
"""

from __future__ import annotations

from mcp.server.mcpserver.exceptions import ToolError

from engine.interface import MissingExtra, require_extra


def require(work: str, tool: str) -> None:
    """Raise ``ToolError`` naming the install command when ``tool`` can't do ``work`` ("train", "export")."""
    try:
        require_extra(work, tool)
    except MissingExtra as exc:
        raise ToolError(str(exc)) from None
