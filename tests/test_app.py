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
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from app_host import (
    CHROMIUM,
    CHROMIUM_ARGS,
    SPEC_HOST_START_HEIGHT,
    Dashboard,
    SpecHostDashboard,
    apps_host,
    at_least,
    browser_or_skip,
    contains,
    equals,
)
from mcp import Client, StdioServerParameters
from mcp.server.apps import APP_MIME_TYPE
from tool_calls import structured, until_done

from backprop_mcp.app import DASHBOARD_URI, MAX_POINTS, VIEW_TOOL, _forgetting, _thin
from backprop_mcp.figures import grouped, is_share, label_of
from backprop_mcp.job_events import JobTail
from backprop_mcp.server import build_server
from engine.contract import events as ev
from engine.contract import grpo_figures as gf
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
        started = structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))
        await until_done(client, started["job_id"])
        view = structured(await client.call_tool(VIEW_TOOL, {"job_id": started["job_id"]}))
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
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))["job_id"]
        await until_done(client, job_id)
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
        await until_done(client, structured(started)["job_id"])
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
        job_id = structured(started)["job_id"]
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
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            assert status["state"] == "cancelled"
            step = status["progress"]["step"]  # the real training loop's cancel, told for a person
            said = f"Cancelled at step {step} of {STEPS_UNTIL_CANCEL}. Its checkpoint at step {step} is kept."
            await board.until("where it stopped", lambda: equals(board.text("#stopped-message"), said))
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
                assert (await until_done(client, structured(started)["job_id"]))["state"] == "succeeded"

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
            await until_done(client, export_id)

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


# -- the method's own figures, the frame's height, the bar's contrast, a cancel in words ------------

# A stand-in for a preference or GRPO job: the engine's real worker (engine.jobs.worker.run_job: its
# lock, cancel handling, result.json and finished event with the resume command) with the recipe
# replaced by one that reports what those methods' steps report — Progress and Eval events whose
# `metrics` carry trl's names — without a model, so a browser sees many steps in seconds. GRPO's names
# are the engine's own declaration (engine.contract.grpo_figures, which tests/test_grpo_step.py checks
# against a real step): a figure added there and not here stops this worker. A GRPO job holds no
# evaluation: its Progress events alone. The real recipes' figures are tested with the recipes.
# Arguments: steps, seconds per step, method.
METRICS_WORKER = """
import math, sys, time
import engine.jobs.worker as worker
from engine.contract import events as ev, grpo_figures as gf
from engine.contract.errors import JobCancelled
from engine.contract.spec import JobResult

STEPS, DELAY, METHOD = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]

def figures(step):
    t = step / STEPS
    if METHOD == "grpo":
        fmt, answer = min(1.0, 0.1 + t), 0.6 * t
        values = {gf.REWARD: 0.5 * (fmt + answer), gf.REWARD_STD: 0.4 * (1 - t),
                  gf.reward_mean("format"): fmt, gf.reward_spread("format"): 0.5 * (1 - t),
                  gf.reward_mean("answer"): answer, gf.reward_spread("answer"): 0.3,
                  gf.FRAC_REWARD_ZERO_STD: 0.5 * (1 - t), gf.MEAN_LENGTH: 40 - 10 * t, gf.MIN_LENGTH: 20.0,
                  gf.MAX_LENGTH: 64.0, gf.CLIPPED_RATIO: 0.2 * (1 - t), gf.MEAN_TERMINATED_LENGTH: 35 - 10 * t,
                  gf.SAMPLING_SECONDS: 0.5, gf.KL: 0.002 * step}
        return {name: values[name] for name in gf.step_figures(["format", "answer"], with_kl=True)}
    chosen, rejected = 0.8 * t, -1.2 * t
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": min(1.0, 0.5 + t), "logps/chosen": -60 + 8 * t,
            "logps/rejected": -62 - 15 * t}

HELD_OUT = ("rewards/accuracies", "rewards/margins")

def recipe(spec, job_dir, events, cancel_check, own_process=False):
    events.stage("training")
    for step in range(1, STEPS + 1):
        if cancel_check():  # as engine.training.loop does: checkpoint, then stop
            events.emit(ev.Checkpoint(step=step - 1, path=str(job_dir / "checkpoint")))
            raise JobCancelled(f"cancelled at step {step - 1} of {STEPS}; a checkpoint was saved")
        events.emit(ev.Progress(step=step, total=STEPS, global_step=step, loss=0.7 * math.exp(-step / STEPS),
                                metrics=figures(step), eta_s=DELAY * (STEPS - step)))
        if step % 5 == 0 and METHOD != "grpo":
            held = {k: v for k, v in figures(step).items() if k in HELD_OUT}
            events.emit(ev.Eval(global_step=step, loss=0.8 * math.exp(-step / STEPS), examples=8, metrics=held))
        time.sleep(DELAY)
    return JobResult(status="succeeded", kind="finetune", metrics={"train_loss": 0.7 * math.exp(-1)})

worker.run_recipe = recipe
sys.exit(worker.run_job(sys.argv[-1]))
"""
DPO_NAMES = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]


def _metrics_server(home: Path, steps: int, delay_s: float, method: str) -> Any:
    command = [sys.executable, "-c", METRICS_WORKER, str(steps), str(delay_s), method]
    return build_server(home, worker_command=command)


@pytest.fixture
def engine_from_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in workers run in their job folder: make them import this checkout's engine."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


@pytest.mark.anyio
@pytest.mark.usefixtures("engine_from_this_checkout")
async def test_job_status_and_the_view_carry_the_methods_figures(tmp_path: Path) -> None:
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = _metrics_server(tmp_path / "home", steps=10, delay_s=0, method="dpo")
    async with Client(server, extensions=apps_host()) as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))["job_id"]
        status = await until_done(client, job_id)
        view = structured(await client.call_tool(VIEW_TOOL, {"job_id": job_id}))
    assert status["state"] == "succeeded"
    latest = status["progress"]["metrics"]  # job_status: the figures of the last step
    assert list(latest) == DPO_NAMES
    assert latest["rewards/chosen"] == pytest.approx(0.8) and latest["rewards/accuracies"] == 1.0
    curves = {c["name"]: c for c in view["metrics"]}
    assert list(curves) == DPO_NAMES  # in the order the engine first reported them
    assert all(len(c["train"]) == 10 for c in curves.values())
    assert curves["rewards/margins"]["train"][-1] == [10.0, pytest.approx(2.0)]
    assert [p[0] for p in curves["rewards/accuracies"]["eval"]] == [5.0, 10.0]  # held-out, at each evaluation
    assert curves["logps/chosen"]["eval"] == []


def test_the_tail_keeps_finite_figures_and_a_bounded_number_of_series(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    many = {f"rewards/f{i}/mean": float(i) for i in range(40)}  # a user's reward file with 40 functions
    with EventWriter(path) as events:
        events.emit(ev.Progress(step=1, total=2, metrics=many))
        events.emit(ev.Progress(step=2, total=2, loss=1.0, metrics={"rewards/f0/mean": 2.0, "kl": 0.1}))
        events.emit(ev.Eval(global_step=2, loss=1.0, examples=4, metrics={"rewards/f0/mean": 1.5}))
    tail = JobTail(path)
    tail.poll()
    assert len(tail.metrics) == 32 and "kl" not in tail.metrics  # the first 32 names are followed
    assert tail.metrics["rewards/f0/mean"] == [(1.0, 0.0), (2.0, 2.0)]  # a step without loss still counts
    assert tail.loss == [(2.0, 1.0)] and tail.eval_metrics == {"rewards/f0/mean": [(2.0, 1.5)]}


def test_figures_are_sorted_into_charts_without_knowing_the_method() -> None:
    grpo = gf.step_figures(["format", "answer"], with_kl=True)  # as the engine's step reports them
    assert grouped(grpo) == [
        ("reward", ["reward", "rewards/format/mean", "rewards/answer/mean"]),  # the reward chart first
        ("reward_std", ["reward_std", "rewards/format/std", "rewards/answer/std"]),
        ("frac_reward_zero_std", ["frac_reward_zero_std"]),
        ("completions", [gf.MEAN_LENGTH, gf.MIN_LENGTH, gf.MAX_LENGTH, gf.MEAN_TERMINATED_LENGTH]),
        ("clipped_ratio", [gf.CLIPPED_RATIO]),
        ("timing", [gf.SAMPLING_SECONDS]),
        ("kl", ["kl"]),
    ]
    assert [label_of(n, 3) for n in ("reward", "rewards/format/mean", "rewards/format/std")] == [
        "total",
        "format",
        "format",
    ]
    assert label_of(gf.MEAN_LENGTH, 4) == "mean" and label_of(gf.CLIPPED_RATIO, 1) == "clipped_ratio"
    assert label_of("kl", 1) == "kl" and label_of("rewards/chosen", 4) == "chosen"
    assert (
        is_share("rewards/accuracies")
        and is_share("frac_reward_zero_std")
        and is_share(gf.CLIPPED_RATIO)
        and not is_share("rewards/margins")
        and not is_share(gf.MEAN_LENGTH)
    )
    assert grouped(["logps/chosen", "rewards/chosen"])[0][0] == "rewards"
    assert grouped(["entropy"]) == [("entropy", ["entropy"])]  # a method with no reward: its own first


def _luminance(css: str) -> float:
    """WCAG relative luminance of a computed CSS colour: rgb()/rgba() or color(srgb ...)."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", css)]
    channels = [v / 255 for v in numbers[:3]] if css.startswith("rgb") else numbers[:3]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def _contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


async def _bar_contrasts(frame: Any) -> tuple[float, float]:
    """(the empty bar's edge against the panel it sits on, the filled part against the empty part)."""

    def style(selector: str, prop: str) -> Any:
        return frame.locator(selector).evaluate(f"e => getComputedStyle(e).{prop}")

    panel = await style("#progress-section", "backgroundColor")
    edge = await style("#progress", "borderTopColor")
    track = await style("#progress", "backgroundColor")
    fill = await style("#progress-fill", "backgroundColor")
    return _contrast(edge, panel), _contrast(fill, track)


def test_the_contrast_check_itself() -> None:
    assert _contrast("rgb(0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(21)
    assert _contrast("color(srgb 1 1 1)", "rgb(255, 255, 255)") == pytest.approx(1)
    # issue 24: the old empty bar (#21262d) on a dark host's panel (#262624) was invisible
    assert _contrast("rgb(33, 38, 45)", "rgb(38, 38, 36)") < 1.1


@pytest.mark.anyio
@pytest.mark.usefixtures("engine_from_this_checkout")
@pytest.mark.parametrize(("method", "theme"), [("dpo", "light"), ("grpo", "dark")])
async def test_the_dashboard_charts_the_methods_figures_beside_the_loss(
    tmp_path: Path, method: str, theme: str
) -> None:
    async_playwright = browser_or_skip()
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = _metrics_server(tmp_path / "home", steps=20, delay_s=0, method=method)
    async with Client(server, extensions=apps_host()) as client, async_playwright() as pw:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))["job_id"]
        await until_done(client, job_id)
        args = {"job_id": job_id, "wait_s": 0}
        result = await client.call_tool("job_status", args)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            board = await Dashboard.open(browser, client, "job_status", args, result, theme)
            await board.until("the finished state", lambda: equals(board.text("#state"), "succeeded"))
            await board.until(
                "the figures' chart", lambda: at_least(board.number("#metrics-chart", "data-series"), 1)
            )
            frame = await board.frame()
            chart = frame.locator("#metrics-chart")
            assert await board.number("#chart", "data-train-points") == 20  # the loss, as before
            if method == "dpo":
                primary = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
                assert await frame.locator("#metrics-chart-h").text_content() == "Rewards"
                assert await board.attr("#metrics-chart", "data-names") == ",".join(primary)
                assert (
                    await board.number("#metrics-chart", "data-eval-points") == 8
                )  # 2 figures x 4 evaluations
                legend = await board.text("#metrics-legend")
                for label in ("chosen", "rejected", "margins", "accuracies 100%", "held-out 100%"):
                    assert label in legend, legend
                others = ["logps"]
            else:
                # the total reward and each function's mean beside the loss; the spreads apart
                primary = [gf.REWARD, gf.reward_mean("format"), gf.reward_mean("answer")]
                assert await frame.locator("#metrics-chart-h").text_content() == "Reward"
                assert await board.attr("#metrics-chart", "data-names") == ",".join(primary)
                assert await board.number("#metrics-chart", "data-eval-points") == 0  # GRPO holds none out
                legend = await board.text("#metrics-legend")
                assert "total" in legend and "format" in legend and "answer" in legend
                others = [
                    "reward_std",
                    "frac_reward_zero_std",
                    "completions",
                    "clipped_ratio",
                    "timing",
                    "kl",
                ]
                captions = frame.locator("#more-figures figcaption")
                assert [await captions.nth(i).text_content() for i in range(await captions.count())] == [
                    "Reward spread (std)",
                    "Prompts whose completions all scored the same",
                    "Completion length (tokens)",
                    "Completions cut off at the length limit",
                    "Time per step (s)",
                    "KL divergence",
                ]
            assert await board.number("#metrics-chart", "data-points") == 20 * len(primary)
            for name in primary:  # one line per figure, named for what it draws
                assert await chart.locator(f"path.series[data-name='{name}']").count() == 1
            groups = frame.locator("#more-figures svg")
            assert [
                await groups.nth(i).get_attribute("data-group") for i in range(await groups.count())
            ] == others
            # beside the loss: the same row, to its right
            loss_box = await frame.locator("#loss-section").bounding_box()
            metrics_box = await frame.locator("#metrics-chart-section").bounding_box()
            assert loss_box and metrics_box
            assert (
                abs(loss_box["y"] - metrics_box["y"]) < 1
                and metrics_box["x"] > loss_box["x"] + loss_box["width"]
            )
            edge, fill = await _bar_contrasts(frame)
            assert edge >= 3 and fill >= 3, (edge, fill)  # WCAG 1.4.11: 3:1 for a component's parts
            await board.screenshot(tmp_path / f"dashboard-{method}.png")
        finally:
            await browser.close()


@pytest.mark.anyio
@pytest.mark.usefixtures("engine_from_this_checkout")
@pytest.mark.parametrize("theme", ["dark", "light"])
async def test_in_a_host_written_from_the_spec_the_frame_fits_the_content(tmp_path: Path, theme: str) -> None:
    async_playwright = browser_or_skip()
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = _metrics_server(tmp_path / "home", steps=10, delay_s=0, method="dpo")
    async with Client(server, extensions=apps_host()) as client, async_playwright() as pw:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(data)}))["job_id"]
        await until_done(client, job_id)
        args = {"job_id": job_id, "wait_s": 0}
        result = await client.call_tool("job_status", args)
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            board = await SpecHostDashboard.open_in_spec_host(
                browser, client, "job_status", args, result, theme
            )
            await board.until("the finished state", lambda: equals(board.text("#state"), "succeeded"))
            await board.until(
                "the figures' chart", lambda: at_least(board.number("#metrics-chart", "data-series"), 1)
            )
            frame = await board.frame()
            assert await frame.locator("html").get_attribute("data-theme") == theme

            async def blank_below() -> float:  # the frame's bottom minus the content's bottom, in px
                outer = await board.page.locator("#sandbox").bounding_box()
                inner = await frame.locator("main").bounding_box()
                assert outer and inner
                return (outer["y"] + outer["height"]) - (inner["y"] + inner["height"])

            async def fits() -> bool:
                return abs(await blank_below()) <= 1

            await board.until("a frame sized to its content", fits)
            outer = await board.page.locator("#sandbox").bounding_box()
            assert outer and outer["height"] < SPEC_HOST_START_HEIGHT  # it shrank to the content
            reports = await board.page.evaluate("window.sizeReports")
            assert reports and reports[-1]["height"] == pytest.approx(outer["height"], abs=1)
            edge, fill = await _bar_contrasts(frame)
            assert edge >= 3 and fill >= 3, (edge, fill)
            await board.screenshot(tmp_path / f"spec-host-{theme}.png")
        finally:
            await browser.close()


@pytest.mark.anyio
@pytest.mark.usefixtures("engine_from_this_checkout")
async def test_a_cancel_from_the_dashboard_is_told_in_words_for_a_person(tmp_path: Path) -> None:
    async_playwright = browser_or_skip()
    data = _chat_rows(tmp_path / "chat.jsonl", ["red", "green"])
    server = _metrics_server(tmp_path / "home", steps=40, delay_s=1.0, method="dpo")
    async with Client(server, extensions=apps_host()) as client, async_playwright() as pw:
        args = {"dataset_path": str(data)}
        started = await client.call_tool("start_finetune", args)
        job_id = structured(started)["job_id"]
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            board = await Dashboard.open(browser, client, "start_finetune", args, started, "dark")
            await board.until("a few steps", lambda: at_least(board.number("#steps", "data-step"), 2))
            frame = await board.frame()
            await frame.locator("#notice").evaluate(  # keep every notice the app shows, however brief
                "n => { window.notices = []; new MutationObserver(() => window.notices.push(n.textContent))"
                ".observe(n, { childList: true, characterData: true, subtree: true }); }"
            )
            await frame.get_by_role("button", name="Cancel job").click()
            await board.until("the cancelled state", lambda: equals(board.text("#state"), "cancelled"))
            await board.until(
                "where it stopped", lambda: contains(board.text("#stopped-message"), "Cancelled")
            )
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            step = status["progress"]["step"]
            notices = await frame.evaluate("window.notices")
            assert "Stopping: the job saves a checkpoint at its next step, then ends." in notices
            assert await board.text("#notice") == ""  # the job's end now says it
            said = await board.text("#stopped-message")
            assert said == f"Cancelled at step {step} of 40. Its checkpoint at step {step} is kept."
            assert await board.text("#resume-command") == f"backprop resume {status['job_dir']}"
            assert not await frame.locator("#error").is_visible()  # a cancel is no error
            page_text = await board.text("main")
            assert "job_status" not in page_text and "Cancelled: cancelled" not in page_text
            doubled = re.search(r"\b([A-Za-z]+)[^\w\n]+\1\b", page_text, re.IGNORECASE)  # on one line
            assert doubled is None, doubled
            await board.screenshot(tmp_path / "dashboard-cancelled-for-a-person.png")
        finally:
            await browser.close()
            await client.call_tool("cancel_job", {"job_id": job_id, "force": True})
