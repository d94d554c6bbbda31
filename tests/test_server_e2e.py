"""The whole flow with the real engine, over real stdio: the server a client would run, the worker
it spawns (``python -m engine run``), the tiny preset trained for a few steps on the CPU.

start_finetune -> job_status with progress notifications -> succeeded -> the adapter exists and
loads (try_model applies it to the base model in an engine subprocess) -> check_dataset's token
statistics. One job is shared by the checks to keep the suite fast; the tiny model is built once
under ``$BACKPROP_TEST_CACHE`` when it is set.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("BACKPROP_TEST_CACHE")
    return Path(cache) / "home" if cache else tmp_path_factory.mktemp("backprop-home")


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


@pytest.mark.slow
@pytest.mark.anyio
async def test_real_finetune_over_stdio(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("red", "green", "blue", "cyan", "pink", "gold")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO), "BACKPROP_POLL_S": "0.2"}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "backprop_mcp"], env=env, cwd=str(REPO)
    )
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    async with Client(params) as client:
        started = structured(
            await client.call_tool(
                "start_finetune", {"dataset_path": str(data), "model": "tiny", "steps": 4, "device": "cpu"}
            )
        )
        job_id = started["job_id"]
        status: dict[str, Any] = {}
        for _ in range(20):  # each call waits at most 45 s; a slow CI machine needs a few
            status = structured(
                await client.call_tool(
                    "job_status", {"job_id": job_id, "wait_s": 45}, progress_callback=on_progress
                )
            )
            if status["state"] not in ("queued", "running"):
                break
        assert status["state"] == "succeeded", status
        assert status["progress"]["step"] == 4 and status["metrics"]["steps"] == 4
        adapter = Path(status["artifacts"]["adapter"])
        assert (adapter / "adapter_config.json").exists()
        # notifications sample the job; the last one says where it ended, even if it ran between samples
        assert progress[-1][0] == 100.0 and progress[-1][1].startswith("succeeded: step 4/4"), progress

        events = json.loads((await client.read_resource(f"backprop://jobs/{job_id}/events")).contents[0].text)
        assert sum(e["type"] == "progress" for e in events["events"]) == 4

        tried = structured(
            await client.call_tool("try_model", {"job_id": job_id, "prompt": "Say red", "max_new_tokens": 4})
        )
        assert tried["adapter"] == str(adapter) and tried["new_tokens"] >= 1
        assert "<|im_start|>user" in tried["prompt"]  # the chat template was applied

        checked = structured(await client.call_tool("check_dataset", {"path": str(data), "model": "tiny"}))
        assert checked["rows_ok"] == 6 and checked["format"] == "chat" and checked["ready"]
        assert checked["tokens"]["examples"] == 6 and checked["tokens"]["max"] >= checked["tokens"]["min"] > 0
