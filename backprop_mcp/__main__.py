"""``backprop-mcp`` / ``python -m backprop_mcp``: serve MCP over stdio.

Logs go to stderr (stdout carries the protocol). ``BACKPROP_LOG_LEVEL`` sets the level.
"""

from __future__ import annotations

import logging
import os
import sys


def main() -> None:
    level = os.environ.get("BACKPROP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from backprop_mcp.server import server

    server.run()


if __name__ == "__main__":
    main()
