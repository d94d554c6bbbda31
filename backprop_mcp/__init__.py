"""backprop-mcp's MCP server: fine-tuning jobs as tools and resources over stdio.

Torch-free by design: ``import backprop_mcp.server`` loads the MCP SDK and the engine's
torch-free contract modules only; training runs in detached ``python -m engine run`` workers.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
