"""The server as clients run it: a subprocess speaking MCP over stdio.

Jobs use the stand-in worker (see ``test_server_worker_standin.py``), set through
``BACKPROP_WORKER_COMMAND`` like a user pointing the server at another Python environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from engine.jobs import processes as procs

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).with_name("test_server_worker_standin.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def server_params(home: Path, *, steps: int, step_s: float) -> StdioServerParameters:
    env = {
        **os.environ,
        "BACKPROP_HOME": str(home),
        "BACKPROP_POLL_S": "0.1",
        "PYTHONPATH": str(REPO),
        "BACKPROP_WORKER_COMMAND": json.dumps(
            [sys.executable, str(STANDIN), "--steps", str(steps), "--step-s", str(step_s)]
        ),
    }
    return StdioServerParameters(command=sys.executable, args=["-m", "backprop_mcp"], env=env, cwd=str(REPO))


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text((json.dumps(row) + "\n") * 4)
    return path


def test_importing_the_server_leaves_torch_out() -> None:
    code = (
        "import sys, backprop_mcp.server, backprop_mcp.__main__; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'matplotlib', 'numpy') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_full_flow_over_stdio(tmp_path: Path, dataset: Path, mode: str) -> None:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async with Client(server_params(tmp_path / "home", steps=6, step_s=0.15), mode=mode) as client:
        started = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))
        status = structured(
            await client.call_tool(
                "job_status", {"job_id": started["job_id"], "wait_s": 30}, progress_callback=on_progress
            )
        )
        assert status["state"] == "succeeded"
        assert Path(status["artifacts"]["adapter"]).is_dir()
        assert len(progress) >= 2 and progress == sorted(progress)


@pytest.mark.anyio
async def test_a_killed_server_leaves_the_job_running_and_a_new_one_reports_it(
    tmp_path: Path, dataset: Path
) -> None:
    home = tmp_path / "home"
    params = server_params(home, steps=100, step_s=0.1)
    job_id = ""
    with contextlib.suppress(Exception):  # the connection breaks when its server is killed
        async with Client(params) as client:
            job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
                "job_id"
            ]
            events = home / "jobs" / job_id / "events.jsonl"
            with anyio.fail_after(20):
                while "parent_pid" not in (events.read_text() if events.exists() else ""):
                    await anyio.sleep(0.05)
            lines = [json.loads(x) for x in events.read_text().splitlines()]
            server_pid = next(x["details"]["parent_pid"] for x in lines if x["type"] == "log")
            worker_pid = next(x["pid"] for x in lines if x["type"] == "started")
            os.kill(server_pid, signal.SIGKILL)
            await anyio.sleep(0.3)
            await client.call_tool("list_jobs", {})  # fails: the server is gone
    assert job_id
    # The detached worker outlived its server...
    assert procs.is_alive(procs.ProcessIdentity(worker_pid, procs.process_start_time(worker_pid) or 0.0))
    time.sleep(0.2)
    # ...and a new server finds it, follows it and reports its end.
    async with Client(params, mode="legacy") as client:
        listing = structured(await client.call_tool("list_jobs", {}))
        assert listing["jobs"][0]["job_id"] == job_id
        assert listing["jobs"][0]["state"] in (
            "running",
            "succeeded",
        )  # no timing assumption on a slow machine
        for _ in range(10):
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 10}))
            if status["state"] != "running":
                break
        assert status["state"] == "succeeded" and status["progress"]["step"] == 100
