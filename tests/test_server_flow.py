"""``benchmarks/server_flow.py`` in its CPU smoke mode: the real MCP server over stdio, the real
worker on the tiny model, then the fixed-length engine run it compares with. Its numbers mean
nothing at these shapes; what is checked is that the flow the GPU measurement runs works end to end
(it broke once when ``train_speed.run_engine`` changed under it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_server_flow_smoke_runs_the_whole_flow_and_the_fixed_length_comparison(tmp_path: Path) -> None:
    out = tmp_path / "flow.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "server_flow.py"), "--tiny", "--compare-fixed",
               "--workdir", str(tmp_path / "work"), "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    flow = json.loads(out.read_text())
    assert flow["state"] == "succeeded" and flow["error"] is None
    # the defaults the server chose, each with its reason, as a user sees them
    assert {"max_seq_length", "micro_batch_size", "gradient_accumulation", "packing"} <= flow[
        "defaults"
    ].keys()
    assert flow["tokens_per_s"] > 0 and flow["timed_steps"] >= 1
    assert flow["fixed"]["tokens_per_s"] > 0 and flow["flow_over_fixed"] > 0
    assert "flow / fixed" in done.stdout
