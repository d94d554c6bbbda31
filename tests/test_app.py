"""The job dashboard (an MCP App): what hosts see in the lists, the view it draws from, and the app
itself rendered in headless Chromium, driving the real server over stdio.

The browser tests put the dashboard in a minimal host page (tests/app_host.py) that speaks the app
protocol the way Claude or VS Code do and forwards the app's tools/call to the real server. They
need Debian's ``chromium`` and the ``playwright`` package (never ``playwright install``); without
them they skip and say why. Screenshots land in the test's tmp folder; with
``BACKPROP_DOCS_SCREENSHOTS=1`` the finished-job ones are also written to ``docs/`` for the README.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from app_host import (
    CHROMIUM,
    CHROMIUM_ARGS,
    Dashboard,
    apps_host,
    at_least,
    browser_or_skip,
    contains,
    equals,
)
from mcp import Client, StdioServerParameters
from mcp.server.apps import APP_MIME_TYPE

from backprop_mcp.app import DASHBOARD_URI, MAX_POINTS, VIEW_TOOL, _forgetting, _thin
from backprop_mcp.job_events import JobTail
from backprop_mcp.server import build_server
from engine.contract import events as ev
from engine.contract.events import EventWriter

REPO = Path(__file__).resolve().parents[1]
LINKED = {"start_finetune", "run_slao_series", "job_status", "export_gguf"}
MODES = ["legacy", "auto"]
STEPS_UNTIL_CANCEL = 2000  # never reached: the test cancels the job while it runs


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the lists and the resource, in process --------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_an_apps_host_sees_the_dashboard_links_and_resource(tmp_path: Path, mode: str) -> None:
    async with Client(build_server(tmp_path / "home"), mode=mode, extensions=apps_host()) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        for name in LINKED:
            assert tools[name].meta == {"ui": {"resourceUri": DASHBOARD_URI}}, name
        assert tools[VIEW_TOOL].meta == {"ui": {"resourceUri": DASHBOARD_URI, "visibility": ["app"]}}
        assert tools[VIEW_TOOL].annotations and tools[VIEW_TOOL].annotations.read_only_hint
        assert not any((t.meta or {}).get("ui") for n, t in tools.items() if n not in LINKED | {VIEW_TOOL})

        listed = {str(r.uri): r for r in (await client.list_resources()).resources}
        assert listed[DASHBOARD_URI].mime_type == APP_MIME_TYPE
        content = (await client.read_resource(DASHBOARD_URI)).contents[0]
        assert content.mime_type == APP_MIME_TYPE
        html = content.text
    # One self-contained file: small, nothing fetched from anywhere, a CSP that allows nothing external.
    assert len(html.encode()) < 100_000
    assert "default-src 'none'" in html
    for external in (
        'src="http',
        "src='http",
        'href="http',
        "@import",
        "url(http",
        "fetch(",
        "XMLHttpRequest",
    ):
        assert external not in html, external


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_host_without_apps_sees_todays_lists(tmp_path: Path, mode: str) -> None:
    server = build_server(tmp_path / "home")
    # What the SDK itself does (checked, mcp 2.3): an extension's tools and resources are listed to
    # every client, app-only or not; hiding them from plain hosts is our middleware's job.
    assert VIEW_TOOL in {t.name for t in await server.list_tools()}
    async with Client(server, mode=mode) as client:
        tools = (await client.list_tools()).tools
        resources = (await client.list_resources()).resources
    assert VIEW_TOOL not in {t.name for t in tools}
    assert all(not (t.meta or {}).get("ui") for t in tools)
    assert {t.name for t in tools} >= LINKED
    assert all(not str(r.uri).startswith("ui://") for r in resources)


# -- the view's shaping, on real event logs ---------------------------------------------------------


def test_the_forgetting_matrix_grows_with_each_finished_run(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as events:
        for run, row in ((1, [2.0, None]), (2, [2.4, 1.5])):
            events.emit(
                ev.RunFinished(
                    run=run,
                    runs=2,
                    loss_row=row,
                    accuracy_row=[None, None],
                    metrics={"slice": f"part-{run}"},
                    series={"loss_backward_transfer": -0.4} if run == 2 else {},
                    merged_adapter=str(tmp_path / "merged"),
                    finetuned_adapter=str(tmp_path / "finetuned"),
                )
            )

    tail = JobTail(path)
    tail.poll()
    view = _forgetting(tail, {})
    assert view is not None
    assert view.slices == ["part-1", "part-2"] and view.loss == [[2.0, None], [2.4, 1.5]]
    assert view.summary == {"loss_backward_transfer": -0.4}
    finished = _forgetting(tail, {"loss_matrix": [[1.0]], "slices": ["all"], "loss_forgetting": 0.1})
    assert finished is not None and finished.loss == [[1.0]] and finished.summary == {"loss_forgetting": 0.1}


# A stand-in for a worker that ran out of GPU memory on a card: no GPU exists here, so this real
# process writes what engine.jobs.worker writes in that case (a step with its NVML sample, the error with
# its hint, result.json, the finished event) through the engine's own EventWriter and write_result.
FAILING_GPU_WORKER = """
import sys
from pathlib import Path
from engine.contract import events as ev
from engine.contract.events import EventWriter
from engine.contract.spec import EVENTS_FILE, JobResult, write_result
job_dir = Path(sys.argv[-1])
error = {"type": "OutOfMemoryError", "message": "CUDA out of memory at micro-batch 1",
         "hint": "Use quantization='4bit' or a shorter max_seq_length."}
with EventWriter(job_dir / EVENTS_FILE) as events:
    events.emit(ev.Started(kind="finetune", pid=0))
    events.stage("training")
    gpu = {"temperature_c": 71, "memory_used_mb": 20480, "memory_total_mb": 81920, "utilization_pct": 97}
    events.emit(ev.Progress(step=1, total=10, global_step=1, loss=2.5, tokens_per_s=1234.5,
                            gpu_memory_gib=18.5, gpu=gpu))
    events.emit(ev.ErrorEvent(exception=error["type"], message=error["message"], hint=error["hint"]))
    write_result(job_dir, JobResult(status="failed", kind="finetune", error=error))
    events.emit(ev.Finished(status="failed", error=error))
"""


@pytest.mark.anyio
async def test_the_view_of_a_failed_gpu_job_has_its_gpu_sample_and_the_error_with_its_hint(
    tmp_path: Path,
) -> None:
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = build_server(tmp_path / "home", worker_command=[sys.executable, "-c", FAILING_GPU_WORKER])
    async with Client(server, extensions=apps_host()) as client:
        started = _structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))
        await _wait_until_done(client, started["job_id"])
        view = _structured(await client.call_tool(VIEW_TOOL, {"job_id": started["job_id"]}))
    assert view["job"]["state"] == "failed" and view["poll_after_s"] is None and not view["can_export"]
    assert view["error"] == {
        "message": "OutOfMemoryError: CUDA out of memory at micro-batch 1",
        "hint": "Use quantization='4bit' or a shorter max_seq_length.",
    }
    assert view["device"]["temperature_c"] == 71 and view["device"]["gpu_memory_used_mb"] == 20480
    assert view["device"]["tokens_per_s"] == 1234.5 and view["device"]["gpu_peak_memory_gib"] == 18.5
    assert view["loss"]["train"] == [[1.0, 2.5]] and view["loss"]["run_starts"] == []


@pytest.mark.anyio
@pytest.mark.parametrize(("host_theme", "system_theme"), [("dark", "light"), (None, "dark"), (None, "light")])
async def test_the_dashboard_shows_a_failure_in_the_hosts_theme_else_the_systems(
    tmp_path: Path, host_theme: str | None, system_theme: str
) -> None:
    async_playwright = browser_or_skip()
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = build_server(tmp_path / "home", worker_command=[sys.executable, "-c", FAILING_GPU_WORKER])
    async with Client(server, extensions=apps_host()) as client, async_playwright() as pw:
        job_id = _structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))["job_id"]
        await _wait_until_done(client, job_id)
        args = {"job_id": job_id, "wait_s": 0}
        result = await client.call_tool("job_status", args)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            board = await Dashboard.open(
                browser, client, "job_status", args, result, host_theme, system_theme
            )
            await board.until("the failed state", lambda: equals(board.text("#state"), "failed"))
            frame = await board.frame()
            assert await frame.get_by_role("alert").is_visible()
            assert "CUDA out of memory" in await board.text("#error-message")
            assert "4bit" in await board.text("#error-hint")
            assert await board.text("#m-temp") == "71 °C" and await board.text("#m-mem") == "20.0 / 80.0 GiB"
            assert await frame.get_by_role("button", name="Cancel job").is_disabled()
            assert await frame.get_by_role("button", name="Export to GGUF").is_disabled()
            assert await frame.locator("html").get_attribute("data-theme") == (host_theme or system_theme)
            sent = await board.page.evaluate("window.appMessages")  # the app's side of the protocol
            assert (
                sent[0]["method"] == "ui/initialize" and sent[0]["params"]["protocolVersion"] == "2026-01-26"
            )
            methods = [m.get("method") for m in sent]
            assert {"ui/notifications/initialized", "ui/notifications/size-changed", "tools/call"} <= set(
                methods
            )
            assert all(m["jsonrpc"] == "2.0" for m in sent)
            await board.screenshot(tmp_path / f"dashboard-failed-{host_theme or system_theme}.png")
        finally:
            await browser.close()


# A stand-in export worker: the real export (merge, convert, quantize, verify) is tested end to end in
# test_e2e_series_export.py; here a real process writes an export's result with the engine's own
# shapes (ParityReport, human_size), one quantization verified and one rejected, in a second.
EXPORT_WORKER = """
import sys
from pathlib import Path
from engine.contract import events as ev
from engine.contract.events import EventWriter
from engine.export.run import human_size
from engine.export.verify import ParityReport
from engine.contract.spec import EVENTS_FILE, JobResult, write_result
job_dir = Path(sys.argv[-1])
def parity(quant, passed):
    return ParityReport(quant, passed, 0.99 if passed else 0.41, 1.0 if passed else 0.5, 0.9, 0.01, 0.05,
                        0.1, 0.01, 64, 3, True, f"{quant}: {'agrees' if passed else 'disagrees'} with transformers").to_dict()
files = {q: {"path": str(job_dir / f"model-{q}.gguf"), "bytes": n, "human": human_size(n)}
         for q, n in (("f16", 3_500_000), ("q4_k_m", 1_100_000))}
metrics = {"files": files, "parity": {"f16": parity("f16", True), "q4_k_m": parity("q4_k_m", False)}}
with EventWriter(job_dir / EVENTS_FILE) as events:
    events.emit(ev.Started(kind="export", pid=0))
    events.stage("verify")
    result = JobResult(status="succeeded", kind="export", metrics=metrics,
                       artifacts={"gguf_f16": files["f16"]["path"]})
    write_result(job_dir, result)
    events.emit(ev.Finished(status="succeeded", metrics=metrics, artifacts=result.artifacts))
"""


@pytest.mark.anyio
async def test_the_dashboard_of_an_export_lists_its_files_and_verification(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    server = build_server(tmp_path / "home", worker_command=[sys.executable, "-c", EXPORT_WORKER])
    async with Client(server, extensions=apps_host()) as client, async_playwright() as pw:
        args = {"adapter_path": str(adapter), "base_model": "tiny", "quantizations": ["f16", "q4_k_m"]}
        started = await client.call_tool("export_gguf", args)
        await _wait_until_done(client, _structured(started)["job_id"])
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            board = await Dashboard.open(browser, client, "export_gguf", args, started, "light")
            await board.until("the finished export", lambda: equals(board.text("#state"), "succeeded"))
            text = await board.text("#export-body")
            assert "f16 (3.3 MiB)" in text and "q4_k_m (1.0 MiB)" in text
            assert not await (await board.frame()).locator("#loss-section").is_visible()  # no curve to draw
            assert "model-q4_k_m.gguf" in text
            assert "✓ verified f16" in text and "✗ failed q4_k_m" in text
            assert not await (await board.frame()).get_by_role("button", name="Export to GGUF").is_visible()
            await board.screenshot(tmp_path / "dashboard-export.png")
        finally:
            await browser.close()


def test_long_curves_are_thinned_for_the_chart_keeping_the_last_point() -> None:
    points = [(float(i), 1.0 / i) for i in range(1, 5001)]
    thinned = _thin(points)
    assert len(thinned) <= MAX_POINTS + 1 and thinned[0] == points[0] and thinned[-1] == points[-1]
    assert _thin(points[:10]) == points[:10]


# -- the dashboard in a real browser, on the real server --------------------------------------------


def _structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content


@asynccontextmanager
async def _real_server(home: Path) -> AsyncIterator[Client]:
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO), "BACKPROP_POLL_S": "0.2"}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "backprop_mcp"], env=env, cwd=str(REPO)
    )
    async with Client(params, extensions=apps_host()) as client:
        yield client


def _chat_rows(path: Path, words: list[str]) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]}
        for w in words
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def _wait_until_done(client: Client, job_id: str) -> dict[str, Any]:
    for _ in range(30):  # each call waits at most 45 s
        status = _structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 45}))
        if status["state"] not in ("queued", "running"):
            return status
    raise AssertionError(f"job {job_id} did not end: {status}")


def _docs_paths(name: str) -> list[Path]:
    return [REPO / "docs" / name] if os.environ.get("BACKPROP_DOCS_SCREENSHOTS") == "1" else []


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_dashboard_follows_a_real_finetune_and_cancels_it(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green", "blue", "cyan", "pink", "gold"])
    async with _real_server(tmp_path / "home") as client, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        args = {"dataset_path": str(data), "model": "tiny", "steps": STEPS_UNTIL_CANCEL, "device": "cpu"}
        started = await client.call_tool("start_finetune", args)
        job_id = _structured(started)["job_id"]
        try:
            board = await Dashboard.open(browser, client, "start_finetune", args, started, "light")

            # Progress and the loss curve appear...
            await board.until("a step", lambda: at_least(board.number("#steps", "data-step"), 1))
            await board.until(
                "a loss point", lambda: at_least(board.number("#chart", "data-train-points"), 1)
            )
            first_step = await board.number("#steps", "data-step")
            first_points = await board.number("#chart", "data-train-points")
            assert await board.text("#state") == "running"
            # ...and update as the job runs, through the app-only tool called via the host.
            await board.until(
                "a later step", lambda: at_least(board.number("#steps", "data-step"), first_step + 1)
            )
            await board.until(
                "more loss points",
                lambda: at_least(board.number("#chart", "data-train-points"), first_points + 1),
            )
            await board.until("progress", lambda: at_least(board.number("#progress", "aria-valuenow"), 0.01))
            assert await (await board.frame()).locator("#chart path.train").count() == 1
            assert "step" in await board.text("#steps")

            # Cancel stops the job: the app calls cancel_job through the host.
            frame = await board.frame()
            await frame.get_by_role("button", name="Cancel job").click()
            await board.until("the cancelled state", lambda: equals(board.text("#state"), "cancelled"))
            await board.screenshot(tmp_path / "dashboard-cancelled.png", min_bytes=10_000)
            status = _structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            assert status["state"] == "cancelled"
            calls = await board.page.evaluate("window.toolCalls")
            assert VIEW_TOOL in calls and "cancel_job" in calls
            assert await frame.get_by_role("button", name="Cancel job").is_disabled()
            assert (tmp_path / "dashboard-cancelled.png").stat().st_size > 10_000
        finally:
            await browser.close()
            # The worker is detached and outlives the server: never leave it training if this test failed.
            await client.call_tool("cancel_job", {"job_id": job_id, "force": True})


@pytest.mark.slow
@pytest.mark.anyio
async def test_the_dashboard_of_a_finished_finetune_and_series_and_its_export_button(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    words = ["red", "green", "blue", "cyan", "pink", "gold", "teal", "gray", "navy", "lime", "rose", "sand"]
    data = _chat_rows(tmp_path / "words.jsonl", words * 2)
    async with _real_server(tmp_path / "home") as client, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            ft_args = {
                "dataset_path": str(data),
                "model": "tiny",
                "steps": 12,
                "device": "cpu",
                "eval_fraction": 0.25,
            }
            series_args = {
                "dataset_paths": [str(data)],
                "model": "tiny",
                "num_runs": 3,
                "steps_per_run": 6,
                "device": "cpu",
                "lora_rank": 4,
                "heldout_fraction": 0.25,
            }
            # Both start at once; the second waits for the CPU (the device lock) and the dashboard says so.
            finetune = await client.call_tool("start_finetune", ft_args)
            series = await client.call_tool("run_slao_series", series_args)
            for started in (finetune, series):
                assert (await _wait_until_done(client, _structured(started)["job_id"]))[
                    "state"
                ] == "succeeded"

            board = await Dashboard.open(browser, client, "start_finetune", ft_args, finetune, "light")
            await board.until("the finished state", lambda: equals(board.text("#state"), "succeeded"))
            assert await board.number("#progress", "aria-valuenow") == 100
            assert await board.number("#chart", "data-train-points") == 12
            assert await board.number("#chart", "data-eval-points") == 1  # the held-out split, at the end
            assert await board.number("#chart", "data-runs") == 1
            assert "step 12 of 12" in await board.text("#steps")
            await board.screenshot(tmp_path / "dashboard.png", *_docs_paths("dashboard.png"))

            # Export calls export_gguf through the host and the dashboard follows the export job.
            frame = await board.frame()
            await frame.get_by_role("button", name="Export to GGUF").click()
            await board.until("the export job", lambda: contains(board.text("#job"), "export ·"))
            assert "export_gguf" in await board.page.evaluate("window.toolCalls")
            export_id = (await board.text("#job")).split("·")[1].strip()
            await client.call_tool("cancel_job", {"job_id": export_id})  # no need to run it to the end here
            await _wait_until_done(client, export_id)

            board = await Dashboard.open(browser, client, "run_slao_series", series_args, series, "dark")
            await board.until("the finished series", lambda: equals(board.text("#state"), "succeeded"))
            assert await board.number("#chart", "data-runs") == 3
            assert await board.number("#chart", "data-train-points") == 18  # 3 runs x 6 steps, end to end
            assert await board.number("#chart", "data-eval-points") == 3  # one held-out row per run
            frame = await board.frame()
            assert await frame.locator("#chart line.boundary").count() == 2
            assert await frame.locator("#forgetting-table tr").count() == 4  # header + one row per run
            assert await frame.locator("#forgetting-table td[aria-label='not yet trained']").count() == 3
            await board.screenshot(tmp_path / "dashboard-series.png", *_docs_paths("dashboard-series.png"))
        finally:
            await browser.close()
