"""What the tests that drive the server through an MCP client share: a tool's structured answer (an error
fails the test with its text), and a wait for a job's end through job_status."""

from __future__ import annotations

from typing import Any


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


async def until_done(client: Any, job_id: str) -> dict[str, Any]:
    """The job's status once it has ended (each job_status call waits at most 45 s, 40 calls in all)."""
    status: dict[str, Any] = {}
    for _ in range(40):
        status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 45}))
        if status["state"] not in ("queued", "running"):
            return status
    raise AssertionError(f"job {job_id} did not end: {status}")
