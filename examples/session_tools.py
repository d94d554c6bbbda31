"""What the example sessions (grpo_session.py, preference_session.py) share: a tool call that prints the
server's answer, as an agent would read it, and a wait for a job's end."""

from __future__ import annotations

import json
from typing import Any

from mcp import Client


async def call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """Call ``tool``, print its answer (the structured one, else the error's text), stop on an error."""
    result = await client.call_tool(tool, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    print(
        f"\n=== {tool}({json.dumps(args)})\n"
        + (json.dumps(result.structured_content, indent=1) if not result.is_error else text)
    )
    if result.is_error:
        raise SystemExit(1)
    return result.structured_content or {}


async def finished(client: Client, job_id: str) -> dict[str, Any]:
    """Wait for the job's end (job_status holds each call up to 40 s); its last status, printed."""
    while True:
        status = (
            await client.call_tool("job_status", {"job_id": job_id, "wait_s": 40})
        ).structured_content or {}
        if status.get("state") in ("succeeded", "failed", "cancelled"):
            return await call(client, "job_status", {"job_id": job_id, "wait_s": 0})
