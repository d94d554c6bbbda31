"""A SLAO series and its export, end to end with the real engine: the MCP tools start real workers
(``python -m engine run``) on the tiny model, the series fills its evaluation matrix, and the merged
adapter it delivers is exported to a GGUF file that llama.cpp loads and that passes the parity
check. Nothing is mocked. Along the way it checks what the typed events carry to the client: series
progress that only grows and names its run, one continuous loss axis, run boundaries, eval points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from backprop_mcp.job_events import JobTail
from backprop_mcp.server import build_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


async def wait_for_end(client: Client, job_id: str) -> tuple[dict[str, Any], list[tuple[float, str]]]:
    """The job's final status, and the progress notifications (percent, message) sent meanwhile."""
    status: dict[str, Any] = {}
    notes: list[tuple[float, str]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, message or ""))

    for _ in range(40):  # each call waits at most 45 s
        status = structured(
            await client.call_tool(
                "job_status", {"job_id": job_id, "wait_s": 45}, progress_callback=on_progress
            )
        )
        if status["state"] not in ("queued", "running"):
            break
    return status, notes


@pytest.mark.slow
@pytest.mark.anyio
async def test_series_through_the_mcp_tool_then_its_merged_adapter_exports_to_gguf(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKPROP_POLL_S", "0.1")  # sample progress often: the runs are short
    data = tmp_path / "words.jsonl"
    words = ["red", "green", "blue", "cyan", "pink", "gold", "teal", "gray", "navy", "lime", "rose", "sand"]
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in words
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))

    async with Client(build_server(tmp_path / "home")) as client:
        series = structured(
            await client.call_tool(
                "run_slao_series",
                {
                    "dataset_paths": [str(data)],
                    "model": str(tiny_model_dir),
                    "num_runs": 3,
                    "steps_per_run": 2,
                    "device": "cpu",
                    "lora_rank": 4,
                    "heldout_fraction": 0.25,
                },
            )
        )
        status, notes = await wait_for_end(client, series["job_id"])
        assert status["state"] == "succeeded", status
        assert status["stage"] is None  # a finished job is in no stage
        # Progress over the whole series only grows, and names the run it is in.
        percents = [p for p, _ in notes]
        assert percents == sorted(percents) and percents[-1] > 60, notes
        # (notifications sample the job every poll, so a short run can slip between two of them)
        assert any(m.startswith(("run 2/3", "run 3/3")) for _, m in notes), notes
        # The loss curve has one continuous x axis across runs, with run boundaries and an eval curve.
        tail = JobTail(Path(status["job_dir"]) / "events.jsonl")
        tail.poll()
        xs = [x for x, _ in tail.loss]
        assert xs == sorted(xs) and len(set(xs)) == len(xs) == 6, tail.loss
        assert len(tail.run_starts) == 3 and len(tail.eval_loss) == 3, (tail.run_starts, tail.eval_loss)
        png = await client.read_resource(f"backprop://jobs/{series['job_id']}/loss.png")
        assert png.contents[0].blob
        result = json.loads((Path(status["job_dir"]) / "result.json").read_text())
        loss_matrix = result["metrics"]["loss_matrix"]
        assert len(loss_matrix) == 3
        for matrix in (loss_matrix, result["metrics"]["accuracy_matrix"]):  # the rows have answers
            assert all(row[i] is not None for t, row in enumerate(matrix) for i in range(t + 1)), matrix
        assert (Path(result["artifacts"]["adapter"]) / "adapter_config.json").exists()

        pytest.importorskip("llama_cpp")  # the series above runs without the export extra

        export = structured(
            await client.call_tool("export_gguf", {"job_id": series["job_id"], "quantizations": ["f16"]})
        )
        status, _ = await wait_for_end(client, export["job_id"])
        assert status["state"] == "succeeded", status
        gguf = Path(status["artifacts"]["gguf_f16"])
        parity = json.loads((Path(status["job_dir"]) / "result.json").read_text())["metrics"]["parity"]["f16"]

    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() >= 1000
    finally:
        llm.close()
    assert parity["passed"] is True, parity
