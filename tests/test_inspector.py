"""The real server driven through the official MCP Inspector's command-line mode, as the README says.

``npx @modelcontextprotocol/inspector --cli <venv>/bin/backprop-mcp --method ...`` starts our server
over stdio and prints the JSON answer. Needs Node's ``npx``; the first run fetches the Inspector
from the npm registry (about 20 s). Without ``npx``, or when the package cannot be fetched, the
test is skipped and says why.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "examples" / "data" / "chat.jsonl"
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"  # the version this test was written against
FETCH_TIMEOUT_S = 300
TOOLS = {
    "inspect_gpu",
    "check_dataset",
    "start_finetune",
    "job_status",
    "list_jobs",
    "cancel_job",
    "try_model",
    "run_slao_series",
    "export_gguf",
}


def server_command() -> list[str]:
    script = Path(sys.executable).with_name("backprop-mcp")  # what `pip install` puts beside python
    return [str(script)] if script.is_file() else [sys.executable, "-m", "backprop_mcp"]


@pytest.fixture(scope="module")
def inspector(tmp_path_factory: pytest.TempPathFactory) -> Any:
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("Node's npx is not installed: the MCP Inspector runs on Node")
    home = tmp_path_factory.mktemp("inspector-home")

    def call(*args: str) -> dict[str, Any]:
        argv = [npx, "-y", INSPECTOR, "--cli", "-e", f"BACKPROP_HOME={home}", "-e", f"PYTHONPATH={REPO}"]
        done = subprocess.run(
            [*argv, *server_command(), *args],
            capture_output=True,
            text=True,
            timeout=FETCH_TIMEOUT_S,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return json.loads(done.stdout)

    try:
        first = call("--method", "tools/list")
    except (subprocess.TimeoutExpired, AssertionError) as exc:
        if "npm" in str(exc) or isinstance(exc, subprocess.TimeoutExpired):
            pytest.skip(f"the Inspector could not be fetched from the npm registry: {str(exc)[-300:]}")
        raise
    call.tools = first["tools"]  # type: ignore[attr-defined]
    return call


def test_tools_list_through_the_inspector(inspector: Any) -> None:
    tools = {t["name"]: t for t in inspector.tools}
    assert set(tools) >= TOOLS
    for tool in tools.values():
        lines = tool["description"].splitlines()
        assert not any(line.startswith(" ") for line in lines), tool["name"]  # no docstring indentation
        assert "outputSchema" in tool and tool["annotations"]


def test_tool_calls_through_the_inspector(inspector: Any) -> None:
    gpu = inspector("--method", "tools/call", "--tool-name", "inspect_gpu")
    assert not gpu.get("isError")
    assert {p["preset"] for p in gpu["structuredContent"]["presets"]} >= {"tiny"}
    data = inspector("--method", "tools/call", "--tool-name", "check_dataset", "--tool-arg", f"path={CHAT}")
    assert not data.get("isError"), data
    report = data["structuredContent"]
    assert report["rows_ok"] == 160 and report["format"] == "chat" and report["ready"] is True
