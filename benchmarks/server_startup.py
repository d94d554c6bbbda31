"""Cold start to an answered ``tools/list``: backprop-mcp vs the reference ``mcp-server-git``.

Both servers are started the way an MCP client starts them (a subprocess over stdio) by the SDK's
own stdio client, which runs the ``initialize`` handshake and then ``tools/list``; the clock runs
from just before the spawn to the ``tools/list`` answer. Trials alternate between the two servers
so that both see the same machine load; the script prints both medians in the same run.

The reference server lives in its own virtual environment (it must not share ours):

    python -m venv /tmp/gitref-venv && /tmp/gitref-venv/bin/pip install mcp-server-git
    python benchmarks/server_startup.py --reference /tmp/gitref-venv/bin/mcp-server-git --trials 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

REPO = Path(__file__).resolve().parents[1]


async def time_to_tools_list(params: StdioServerParameters) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with Client(params, mode="legacy") as client:  # initialize + tools/list, as Claude Desktop does
        tools = (await client.list_tools()).tools
        elapsed = time.perf_counter() - t0
    return elapsed, len(tools)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference", default=shutil.which("mcp-server-git") or "/tmp/gitref-venv/bin/mcp-server-git"
    )
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if not Path(args.reference).exists():
        print(
            f"reference server not found at {args.reference}; install it as the docstring says",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        subprocess.run(["git", "init", "-q", str(repo)], check=True)
        env = {**os.environ, "BACKPROP_HOME": str(Path(tmp) / "home"), "PYTHONPATH": str(REPO)}
        servers = {
            "backprop-mcp": StdioServerParameters(
                command=sys.executable, args=["-m", "backprop_mcp"], env=env
            ),
            "mcp-server-git": StdioServerParameters(command=args.reference, args=["--repository", str(repo)]),
        }
        # One untimed start each: the first start after an install compiles bytecode.
        for params in servers.values():
            anyio.run(time_to_tools_list, params)
        times: dict[str, list[float]] = {name: [] for name in servers}
        tool_counts: dict[str, int] = {}
        for trial in range(args.trials):
            order = list(servers) if trial % 2 == 0 else list(reversed(servers))
            for name in order:
                elapsed, count = anyio.run(time_to_tools_list, servers[name])
                times[name].append(elapsed)
                tool_counts[name] = count

    report = {
        name: {
            "median_s": round(statistics.median(ts), 3),
            "min_s": round(min(ts), 3),
            "max_s": round(max(ts), 3),
            "tools": tool_counts[name],
            "trials": len(ts),
        }
        for name, ts in times.items()
    }
    for name, r in report.items():
        print(
            f"{name:16s} cold start -> tools/list: median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, max {r['max_s']:.3f}, {r['tools']} tools, {r['trials']} trials)"
        )
    ratio = report["backprop-mcp"]["median_s"] / report["mcp-server-git"]["median_s"]
    print(f"backprop-mcp / mcp-server-git median ratio: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({**report, "ratio": round(ratio, 3)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
