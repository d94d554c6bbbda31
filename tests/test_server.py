"""The MCP server in process, on both protocol versions (2025-11-25 'legacy' and 2026-07-28 'auto').

Jobs here run the stand-in worker (``test_server_worker_standin.py``): a real detached process that
keeps the worker's side of the job-folder contract without training, so these tests exercise the
server's real spawning, tailing, locking, cancelling and killing in about a second per job.
The real engine worker runs in ``test_server_e2e.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.shared.subscriptions import ResourceUpdated
from mcp.types import ResourceUpdatedNotification, TextContent

from backprop_mcp.server import build_server
from backprop_mcp.store import JobStore
from backprop_mcp.supervisor import Supervisor
from engine.jobs import processes as procs
from engine.jobs.runner import worker_env

STANDIN = Path(__file__).with_name("test_server_worker_standin.py")
MODES = ["legacy", "auto"]
TOOLS = {
    "inspect_gpu",
    "start_finetune",
    "job_status",
    "list_jobs",
    "cancel_job",
    "check_dataset",
    "try_model",
    "run_slao_series",
    "export_gguf",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("BACKPROP_HOME", str(path))
    monkeypatch.setenv("BACKPROP_POLL_S", "0.1")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i}+{i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ]
        }
        for i in range(8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def standin(
    *,
    steps: int = 5,
    step_s: float = 0.05,
    save_s: float = 0.0,
    ignore_cancel: bool = False,
    completions: bool = False,
) -> list[str]:
    argv = [sys.executable, str(STANDIN), "--steps", str(steps), "--step-s", str(step_s)]
    argv += ["--save-s", str(save_s)]
    argv += ["--ignore-cancel"] if ignore_cancel else []
    return [*argv, "--completions"] if completions else argv


def make_server(home: Path, **kwargs: Any) -> MCPServer:
    return build_server(home, worker_command=standin(**kwargs))


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_text(result: Any) -> str:
    assert result.is_error, result.structured_content
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


async def wait_until_done(client: Client, job_id: str, rounds: int = 20) -> dict[str, Any]:
    for _ in range(rounds):
        status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 5}))
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
    raise AssertionError(f"job {job_id} did not end: {status}")


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_tools_are_listed_with_all_hints_and_schemas(home: Path, mode: str) -> None:
    async with Client(make_server(home), mode=mode) as client:
        tools = (await client.list_tools()).tools
        assert {t.name for t in tools} == TOOLS
        for tool in tools:
            a = tool.annotations
            assert a is not None, tool.name
            hints = (a.read_only_hint, a.destructive_hint, a.idempotent_hint, a.open_world_hint)
            assert None not in hints, tool.name
            assert tool.output_schema is not None and tool.description, tool.name
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert resources == {"backprop://jobs", "backprop://gpu"}
        assert templates == {
            "backprop://jobs/{job_id}",
            "backprop://jobs/{job_id}/events",
            "backprop://jobs/{job_id}/loss.png",
        }


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_finetune_flow_reports_progress_and_resources(home: Path, dataset: Path, mode: str) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))

    # The saving after the last step outlasts a poll, so a wait sees step 8/8 while the job still runs.
    async with Client(make_server(home, steps=8, step_s=0.1, save_s=1.0), mode=mode) as client:
        started = structured(
            await client.call_tool(
                "start_finetune", {"dataset_path": str(dataset), "model": "tiny", "steps": 8}
            )
        )
        job_id = started["job_id"]
        assert started["resource_uri"] == f"backprop://jobs/{job_id}"
        assert started["state"] == "queued" and started["spec"]["train"]["steps"] == 8
        status = structured(
            await client.call_tool(
                "job_status", {"job_id": job_id, "wait_s": 30}, progress_callback=on_progress
            )
        )
        assert status["state"] == "succeeded", status
        assert status["progress"]["step"] == 8 and status["progress"]["fraction"] == 1.0
        adapter = Path(status["artifacts"]["adapter"])
        assert (adapter / "adapter_config.json").exists()
        assert status["metrics"]["steps"] == 8
        # Progress notifications arrived while waiting, strictly increasing (as the protocol asks),
        # with step messages, and 100 only for the end.
        assert len(progress) >= 2
        values = [p[0] for p in progress]
        assert values == sorted(set(values))
        assert values.count(100.0) == 1 and str(progress[-1][2]).startswith("succeeded"), progress
        assert any(m and "step" in m for _, _, m in progress)

        listing = structured(await client.call_tool("list_jobs", {}))
        assert [j["job_id"] for j in listing["jobs"]] == [job_id]
        assert listing["jobs"][0]["percent"] == 100.0

        job_json = json.loads((await client.read_resource(f"backprop://jobs/{job_id}")).contents[0].text)
        assert job_json["state"] == "succeeded"
        events = json.loads((await client.read_resource(f"backprop://jobs/{job_id}/events")).contents[0].text)
        types = [e["type"] for e in events["events"]]
        assert types[0] == "started" and types[-1] == "finished" and types.count("progress") == 8
        png = (await client.read_resource(f"backprop://jobs/{job_id}/loss.png")).contents[0]
        assert png.mime_type == "image/png"
        import base64

        assert base64.b64decode(png.blob).startswith(b"\x89PNG\r\n\x1a\n")
        jobs = json.loads((await client.read_resource("backprop://jobs")).contents[0].text)
        assert jobs["jobs"][0]["state"] == "succeeded"
        gpu = json.loads((await client.read_resource("backprop://gpu")).contents[0].text)
        assert "available" in gpu and gpu["summary"]


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # 2025-11-25 on purpose
async def test_resource_updates_reach_a_legacy_subscriber(home: Path, dataset: Path) -> None:
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    # The job runs for several seconds so that it still changes after the subscription is made,
    # even on a loaded machine where the subscribe call itself can take a while.
    async with Client(
        make_server(home, steps=50, step_s=0.1), mode="legacy", message_handler=on_message
    ) as client:
        caps = client.server_capabilities
        assert caps.resources is not None and caps.resources.subscribe
        await client.session.subscribe_resource("backprop://jobs")
        started = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))
        uri = started["resource_uri"]
        await client.session.subscribe_resource(uri)
        await wait_until_done(client, started["job_id"])
        with anyio.fail_after(10):
            while uri not in updates or "backprop://jobs" not in updates:
                await anyio.sleep(0.05)
        await client.session.unsubscribe_resource(uri)


@pytest.mark.anyio
async def test_resource_updates_reach_a_listen_subscriber(home: Path, dataset: Path) -> None:
    async with Client(make_server(home, steps=30, step_s=0.1)) as client:
        started = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))
        uri = started["resource_uri"]
        with anyio.fail_after(20):
            async with client.listen(resource_subscriptions=[uri]) as subscription:
                async for event in subscription:
                    assert isinstance(event, ResourceUpdated)
                    if event.uri == uri:
                        break
        structured(await client.call_tool("cancel_job", {"job_id": started["job_id"], "force": True}))


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_cancel_is_graceful(home: Path, dataset: Path, mode: str) -> None:
    async with Client(make_server(home, steps=400, step_s=0.05), mode=mode) as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
            "job_id"
        ]
        for _ in range(100):  # let it train a little first
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            if status["progress"]:
                break
            await anyio.sleep(0.1)
        answer = structured(await client.call_tool("cancel_job", {"job_id": job_id}))
        assert "cancel requested" in answer["message"]
        status = await wait_until_done(client, job_id)
        assert status["state"] == "cancelled"
        assert status["progress"]["step"] < 400
        result = json.loads((home / "jobs" / job_id / "result.json").read_text())
        assert result["status"] == "cancelled"  # the worker itself stopped: it wrote its result
        again = structured(await client.call_tool("cancel_job", {"job_id": job_id}))
        assert again["state"] == "cancelled" and "already ended" in again["message"]


@pytest.mark.anyio
async def test_the_completions_a_job_writes_are_listed_while_it_runs_and_after_a_cancel(
    home: Path, dataset: Path
) -> None:
    """GRPO's completions.jsonl is in job_status' artifacts from the moment it exists, not only once the job
    has succeeded (the job here runs until it is cancelled)."""
    async with Client(make_server(home, steps=100_000, step_s=0.05, completions=True)) as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
            "job_id"
        ]
        for _ in range(200):
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            if "completions" in status["artifacts"]:
                break
            await anyio.sleep(0.1)
        assert status["state"] == "running", status
        listed = Path(status["artifacts"]["completions"])
        assert listed == (home / "jobs" / job_id / "completions.jsonl").resolve()
        await client.call_tool("cancel_job", {"job_id": job_id})
        status = await wait_until_done(client, job_id)
        assert status["state"] == "cancelled" and "completions" in status["artifacts"], status
        assert Path(status["artifacts"]["completions"]).read_text().startswith('{"step": 1')


@pytest.mark.anyio
async def test_a_worker_that_ignores_cancel_is_killed_after_the_grace_period(
    home: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKPROP_CANCEL_GRACE_S", "0.5")
    async with Client(make_server(home, steps=1000, step_s=0.05, ignore_cancel=True)) as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
            "job_id"
        ]
        await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0.5})
        structured(await client.call_tool("cancel_job", {"job_id": job_id}))
        status = await wait_until_done(client, job_id)
        assert status["state"] == "cancelled"
        assert "by force" in status["error"]
        assert not (home / "jobs" / job_id / "result.json").exists()


@pytest.mark.anyio
async def test_worker_killed_with_sigkill_fails_with_a_reason(home: Path, dataset: Path) -> None:
    async with Client(make_server(home, steps=1000, step_s=0.05), mode="legacy") as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
            "job_id"
        ]
        for _ in range(100):
            status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
            if status["state"] == "running":
                break
            await anyio.sleep(0.1)
        pid = JobStore(home / "jobs.sqlite3").get(job_id).pid  # type: ignore[union-attr]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        status = await wait_until_done(client, job_id)
        assert status["state"] == "failed"
        assert "ended without finishing" in status["error"] and "signal 9" in status["error"]


@pytest.mark.anyio
async def test_two_jobs_on_one_device_queue_and_both_succeed(home: Path, dataset: Path) -> None:
    async with Client(make_server(home, steps=30, step_s=0.1)) as client:
        ids = [
            structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))["job_id"]
            for _ in range(2)
        ]
        seen_queued = None
        for _ in range(200):  # whichever worker takes the device lock first, the other must wait
            states = [
                structured(await client.call_tool("job_status", {"job_id": j, "wait_s": 0})) for j in ids
            ]
            waiting = [
                s for s in states if s["state"] == "queued" and "waiting" in (s["queued_reason"] or "")
            ]
            if waiting:
                seen_queued = waiting[0]["job_id"]
                other = next(s for s in states if s["job_id"] != seen_queued)
                assert other["state"] in ("running", "succeeded")
                break
            if all(s["state"] == "succeeded" for s in states):
                break
            await anyio.sleep(0.05)
        finals = [await wait_until_done(client, j) for j in ids]
        assert [f["state"] for f in finals] == ["succeeded", "succeeded"]
    # The device lock serialised them: one job's log starts with 'queued', and it started only after
    # the other had finished.
    logs = {
        j: [json.loads(x) for x in (home / "jobs" / j / "events.jsonl").read_text().splitlines()] for j in ids
    }
    queued = [j for j, events in logs.items() if events[0]["type"] == "queued"]
    assert len(queued) == 1 and (seen_queued is None or seen_queued == queued[0])
    (other,) = set(ids) - set(queued)
    started = next(e["time"] for e in logs[queued[0]] if e["type"] == "started")
    finished = next(e["time"] for e in logs[other] if e["type"] == "finished")
    assert started >= finished
    assert seen_queued is not None  # the server reported the waiting job as queued


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_bad_arguments_answer_actionable_errors_and_keep_the_store(
    home: Path, dataset: Path, tmp_path: Path, mode: str
) -> None:
    missing = tmp_path / "nope.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    async with Client(make_server(home), mode=mode) as client:
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("start_finetune", {"dataset_path": str(missing)}, "does not exist"),
            ("start_finetune", {"dataset_path": "relative/data.jsonl"}, "absolute path"),
            ("start_finetune", {"dataset_path": str(dataset), "steps": -3}, "steps"),
            ("start_finetune", {"dataset_path": str(dataset), "learning_rate": 5}, "learning_rate"),
            ("start_finetune", {"dataset_path": str(dataset), "model": str(tmp_path)}, "config.json"),
            ("start_finetune", {"dataset_path": str(tmp_path / "nodir" / "x.jsonl")}, "does not exist"),
            (
                "start_finetune",
                {"dataset_path": str(dataset), "model": "qwen2.5-7bb"},
                "did you mean 'qwen2.5-7b'",
            ),
            ("job_status", {"job_id": "ft-20260101-000000-abcdef"}, "list_jobs"),
            ("job_status", {"job_id": "../../etc"}, "not a job id"),
            ("job_status", {"job_id": "ft-20260101-000000-abcdef", "wait_s": -1}, "wait_s"),
            ("cancel_job", {"job_id": "ft-20260101-000000-abcdef"}, "list_jobs"),
            ("list_jobs", {"state": "sleeping"}, "state"),
            ("check_dataset", {"path": str(missing)}, "does not exist"),
            ("try_model", {"prompt": "hi"}, "job_id"),
            ("try_model", {"prompt": "hi", "job_id": "ft-20260101-000000-abcdef"}, "list_jobs"),
            (
                "try_model",
                {"prompt": "hi", "model": "tiny", "adapter_path": str(tmp_path)},
                "adapter_config.json",
            ),
            ("run_slao_series", {"dataset_paths": [str(dataset)]}, "num_runs"),
            ("run_slao_series", {"dataset_paths": []}, "dataset_paths"),
            ("export_gguf", {}, "exactly one"),
            ("export_gguf", {"job_id": "ft-20260101-000000-abcdef"}, "list_jobs"),
            ("export_gguf", {"adapter_path": str(tmp_path), "quantizations": ["q3_xx"]}, "quantizations"),
        ]
        try:
            import engine.data.formats  # noqa: F401 - the malformed-row check needs the engine's data module

            cases.append(("start_finetune", {"dataset_path": str(bad)}, "bad.jsonl:2"))
        except ImportError:
            pass
        if importlib.util.find_spec("unsloth") is None:  # the extra is not installed here
            cases.append(
                ("start_finetune", {"dataset_path": str(dataset), "backend": "unsloth"}, "'unsloth' extra")
            )
        for tool, args, expected in cases:
            text = error_text(await client.call_tool(tool, args))
            assert expected in text, (tool, args, text)
        listing = structured(await client.call_tool("list_jobs", {}))
        assert listing["count"] == 0  # nothing was created by any rejected call
    store = JobStore(home / "jobs.sqlite3")
    assert store.integrity_ok() and store.list() == []


@pytest.mark.anyio
async def test_export_and_try_model_refuse_unfinished_jobs(home: Path, dataset: Path) -> None:
    async with Client(make_server(home, steps=1000, step_s=0.05)) as client:
        job_id = structured(await client.call_tool("start_finetune", {"dataset_path": str(dataset)}))[
            "job_id"
        ]
        assert "succeeded" in error_text(await client.call_tool("export_gguf", {"job_id": job_id}))
        assert "succeeded" in error_text(
            await client.call_tool("try_model", {"job_id": job_id, "prompt": "hi"})
        )
        structured(await client.call_tool("cancel_job", {"job_id": job_id, "force": True}))
        status = structured(await client.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
        assert status["state"] == "cancelled"


@pytest.mark.anyio
async def test_series_and_export_create_jobs_of_their_kind(home: Path, dataset: Path) -> None:
    async with Client(make_server(home, steps=2, step_s=0.01)) as client:
        series = structured(
            await client.call_tool(
                "run_slao_series", {"dataset_paths": [str(dataset)], "num_runs": 2, "steps_per_run": 2}
            )
        )
        assert series["kind"] == "slao_series" and series["spec"]["num_runs"] == 2
        assert series["job_id"].startswith("slao-")
        done = await wait_until_done(client, series["job_id"])
        assert done["state"] == "succeeded"
        export = structured(
            await client.call_tool(
                "export_gguf", {"job_id": series["job_id"], "quantizations": ["q8_0", "q4_k_m"]}
            )
        )
        assert export["kind"] == "export" and export["spec"]["source"] == str(
            home.resolve() / "jobs" / series["job_id"]
        )
        assert export["spec"]["quantizations"] == ["q8_0", "q4_k_m"]
        await wait_until_done(client, export["job_id"])


@pytest.mark.anyio
async def test_inspect_gpu_answers_without_a_gpu(home: Path) -> None:
    async with Client(make_server(home)) as client:
        report = structured(await client.call_tool("inspect_gpu", {}))
        if not report["available"]:  # this CI machine has no NVIDIA driver
            assert report["gpus"] == [] and report["reason"]
            assert "CPU" in report["summary"]
        assert report["cpu_cores"] >= 1 and report["ram_total_gib"] > 0


def test_a_new_server_reattaches_and_marks_dead_jobs_failed(home: Path, dataset: Path) -> None:
    """Reattach at start: a live worker is found again (by pid + start time), a dead one fails."""

    async def start(steps: int) -> str:
        async with Client(make_server(home, steps=steps, step_s=0.05)) as client:
            result = await client.call_tool("start_finetune", {"dataset_path": str(dataset)})
            return structured(result)["job_id"]

    live = anyio.run(start, 40)
    doomed = anyio.run(start, 1000)
    store = JobStore(home / "jobs.sqlite3")
    pid = store.get(doomed).pid  # type: ignore[union-attr]
    assert pid is not None
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)

    async def check() -> None:
        async with Client(make_server(home)) as client:
            assert (await wait_until_done(client, live))["state"] == "succeeded"
            failed = await wait_until_done(client, doomed)
            assert failed["state"] == "failed" and "ended without finishing" in failed["error"]

    anyio.run(check)


@pytest.fixture
def one_small_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8 GiB card as NVML would describe it: the one thing faked here (this machine has no GPU)."""
    from engine.hardware.gpus import GpuInfo, GpuProbe

    card = GpuInfo(
        index=0,
        name="NVIDIA Test 8GB",
        memory_total_mb=8192,
        memory_free_mb=7800,
        memory_used_mb=392,
        utilization_pct=0,
        temperature_c=40,
        power_w=20.0,
        power_limit_w=200.0,
        compute_capability="8.6",
        bf16_supported=True,
        driver_version="560.35",
        cuda_driver_version="12.6",
    )
    monkeypatch.setattr("engine.hardware.gpus.probe_gpus", lambda: GpuProbe(True, [card]))


@pytest.mark.anyio
async def test_gpu_report_and_fit_check_with_a_gpu(home: Path, dataset: Path, one_small_gpu: None) -> None:
    async with Client(make_server(home)) as client:
        report = structured(await client.call_tool("inspect_gpu", {}))
        assert report["available"] and report["gpus"][0]["name"] == "NVIDIA Test 8GB"
        assert "7.6 of 8.0 GiB free" in report["summary"]
        presets = {p["preset"]: p for p in report["presets"]}
        assert presets["tiny"]["fits"] and presets["tiny"]["micro_batch_size"] >= 1
        for p in presets.values():
            assert p["fits"] == (p["micro_batch_size"] is not None)
            assert p["estimated_memory_gib"] > 0
        assert presets["qwen2.5-0.5b"]["estimated_memory_gib"] < presets["qwen2.5-7b"]["estimated_memory_gib"]

        too_big = {"dataset_path": str(dataset), "model": "qwen2.5-7b", "quantization": "16bit"}
        assert "does not fit on GPU 0" in error_text(await client.call_tool("start_finetune", too_big))
        wrong_card = {"dataset_path": str(dataset), "gpu_index": 3}
        assert "inspect_gpu" in error_text(await client.call_tool("start_finetune", wrong_card))
        two_cards = {"dataset_path": str(dataset), "model": "tiny", "gpus": [0, 3]}
        assert "names GPU(s) [3]" in error_text(await client.call_tool("start_finetune", two_cards))
        assert structured(await client.call_tool("list_jobs", {}))["count"] == 0


def test_server_json_matches_the_package() -> None:
    """The MCP Registry entry: the fields the registry schema requires, consistent with pyproject."""
    import re

    root = Path(__file__).resolve().parents[1]
    entry = json.loads((root / "server.json").read_text())
    pyproject = (root / "pyproject.toml").read_text()  # tomllib is 3.11+; the project supports 3.10
    project = {
        "name": re.search(r'^name = "([^"]+)"', pyproject, re.M).group(1),  # type: ignore[union-attr]
        "version": re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1),  # type: ignore[union-attr]
        "scripts": {"backprop-mcp": re.search(r'^backprop-mcp = "([^"]+)"', pyproject, re.M).group(1)},  # type: ignore[union-attr]
    }
    assert entry["$schema"].endswith("/2025-12-11/server.schema.json")
    assert re.fullmatch(r"io\.github\.[A-Za-z0-9-]+/[A-Za-z0-9._-]+", entry["name"])
    assert 1 <= len(entry["description"]) <= 100
    assert entry["version"] == project["version"]
    (package,) = entry["packages"]
    assert package["registryType"] == "pypi" and package["identifier"] == project["name"]
    assert package["version"] == project["version"] and package["runtimeHint"] == "uvx"
    assert package["transport"] == {"type": "stdio"}
    assert project["scripts"]["backprop-mcp"] == "backprop_mcp.__main__:main"
    for var in package["environmentVariables"]:
        assert set(var) <= {"name", "description", "isRequired", "isSecret", "default", "format"}
        assert var["format"] in ("string", "number", "boolean", "filepath")


def test_loss_png_is_a_valid_image_of_the_right_size() -> None:
    import struct
    import zlib

    from backprop_mcp.lossplot import HEIGHT, WIDTH, render_loss_png

    for train, evals in (
        ([], []),
        ([(1.0, 2.0)], []),
        ([(s, 3.0 / s) for s in range(1, 50)], [(10.0, 0.5), (20.0, 0.4)]),
    ):
        png = render_loss_png(train, evals)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", png[16:24])
        assert (width, height) == (WIDTH, HEIGHT)
        idat_len = struct.unpack(">I", png[33:37])[0]
        assert png[37:41] == b"IDAT"
        pixels = zlib.decompress(png[41 : 41 + idat_len])
        assert len(pixels) == HEIGHT * (1 + 3 * WIDTH)
        if train:  # the curve's colour is drawn
            assert bytes((31, 119, 180)) in pixels


@pytest.mark.anyio
async def test_two_servers_sharing_a_state_folder_agree(home: Path, dataset: Path) -> None:
    """Claude Desktop and the Inspector at once: a job started through one is followed by the other."""
    async with (
        Client(make_server(home, steps=6, step_s=0.05)) as first,
        Client(make_server(home), mode="legacy") as second,
    ):
        job_id = structured(await first.call_tool("start_finetune", {"dataset_path": str(dataset)}))["job_id"]
        seen = structured(await second.call_tool("list_jobs", {}))
        assert [j["job_id"] for j in seen["jobs"]] == [job_id]
        by_second = await wait_until_done(second, job_id)
        by_first = structured(await first.call_tool("job_status", {"job_id": job_id, "wait_s": 0}))
        assert by_second["state"] == by_first["state"] == "succeeded"
        assert by_second["artifacts"] == by_first["artifacts"]
    assert JobStore(home / "jobs.sqlite3").integrity_ok()


def _job_without_pid(home: Path) -> tuple[JobStore, Supervisor, Path]:
    """A job row as a server killed between spawning its worker and storing the pid leaves it."""
    store = JobStore(home / "jobs.sqlite3")
    supervisor = Supervisor(home, store, worker_command=standin())
    job_dir = home / "jobs" / "finetune-test"
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps({"kind": "finetune"}))
    store.create("finetune-test", "finetune", job_dir, "")
    return store, supervisor, job_dir


def _spawn_standin(home: Path, job_dir: Path, *, steps: int, step_s: float) -> tuple[Any, Any]:
    """Start the stand-in worker on ``job_dir`` as the supervisor would, without telling the store."""
    return procs.spawn_detached(
        [*standin(steps=steps, step_s=step_s), str(job_dir)],
        cwd=job_dir,
        stderr_path=job_dir / "worker.log",
        env=worker_env(home),
    )


def _wait_for_event(job_dir: Path, kind: str) -> dict[str, Any]:
    events = job_dir / "events.jsonl"
    deadline = time.time() + 30
    while time.time() < deadline:
        for line in events.read_text().splitlines() if events.exists() else []:
            event = json.loads(line)
            if event["type"] == kind:
                return event
        time.sleep(0.05)
    raise AssertionError(f"the worker never emitted {kind!r}")


def test_refresh_answers_what_the_store_holds_not_the_record_it_was_given(home: Path) -> None:
    """list_jobs reads a record, the watcher thread moves the job to running and folds its events
    first: refreshing the older record must still answer running (it once answered queued)."""
    store, supervisor, job_dir = _job_without_pid(home)
    proc, identity = _spawn_standin(home, job_dir, steps=1, step_s=60)
    try:
        store.set_process("finetune-test", identity.pid, identity.start_time)
        _wait_for_event(job_dir, "stage")  # then nothing more for a while: its first step takes 60 s
        stale = store.get("finetune-test")
        assert stale is not None and stale.state == "queued"
        assert supervisor.refresh(store.get("finetune-test")).record.state == "running"  # type: ignore[arg-type]
        assert supervisor.refresh(stale).record.state == "running"
    finally:
        procs.kill_tree(identity)
        proc.wait()


def test_a_refresh_between_the_kill_and_its_record_keeps_the_force_message(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """force_stop kills the worker, then records why; the watcher thread can refresh in between, find
    the worker gone and a cancel requested: it must record the same reason (it once recorded none).
    The interleaving is forced by refreshing right after the real kill."""
    from backprop_mcp import supervisor as supervisor_module

    store, supervisor, job_dir = _job_without_pid(home)
    # one long step: the stand-in cannot honour the cancel itself before the kill, however busy the machine
    proc, identity = _spawn_standin(home, job_dir, steps=1, step_s=60)
    store.set_process("finetune-test", identity.pid, identity.start_time)
    _wait_for_event(job_dir, "started")
    supervisor.request_cancel(store.get("finetune-test"))  # type: ignore[arg-type]
    real_kill = procs.kill_tree

    def kill_then_refresh(identity: procs.ProcessIdentity) -> None:
        real_kill(identity)
        proc.wait()
        supervisor.refresh(store.get("finetune-test"))  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor_module.procs, "kill_tree", kill_then_refresh)
    supervisor.force_stop(store.get("finetune-test"), "cancelled by force: test")  # type: ignore[arg-type]
    record = store.get("finetune-test")
    assert record is not None and record.state == "cancelled"
    assert record.error == "cancelled by force: test"


def test_a_job_ends_once_its_log_says_how_it_ended(home: Path) -> None:
    """The worker writes result.json, then its ``finished`` event. A refresh in between must not end
    the job yet: the dashboard stops polling at the end, and once showed a cancel without the resume
    command that the event carries. The interleaving is forced: the result is written here, while
    the real stand-in worker is still alive in a long step."""
    from engine.contract.events import EventWriter, Finished
    from engine.contract.spec import JobResult, write_result

    store, supervisor, job_dir = _job_without_pid(home)
    proc, identity = _spawn_standin(home, job_dir, steps=1, step_s=60)
    try:
        store.set_process("finetune-test", identity.pid, identity.start_time)
        _wait_for_event(job_dir, "stage")
        write_result(job_dir, JobResult(status="cancelled", kind="finetune", error={"type": "Cancelled"}))
        record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
        assert record.state == "running"
        EventWriter(job_dir / "events.jsonl").emit(
            Finished(status="cancelled", resume_command=f"backprop resume {job_dir}")
        )
        record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
        assert record.state == "cancelled"
        assert supervisor.tail(record).finished is not None
    finally:
        procs.kill_tree(identity)
        proc.wait()


def test_a_worker_unknown_to_the_store_is_adopted_from_its_started_event(home: Path) -> None:
    store, supervisor, job_dir = _job_without_pid(home)
    proc, identity = _spawn_standin(home, job_dir, steps=200, step_s=0.05)
    try:
        started = _wait_for_event(job_dir, "started")
        assert started["pid"] == identity.pid
        record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
        assert record.state == "running" and record.pid == identity.pid
        assert record.pid_start_time is not None
        assert abs(record.pid_start_time - identity.start_time) <= procs.START_TIME_TOLERANCE_S
    finally:
        procs.kill_tree(identity)
        proc.wait()
    # Once adopted, the worker is followed like any other: gone without a result, the job failed.
    record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
    assert record.state == "failed" and "ended without finishing" in (record.error or "")


def test_a_job_resumed_from_the_cli_is_followed_again(home: Path) -> None:
    """`backprop resume` on a job the server had seen cancelled: the server shows it running again
    (new worker, no old error), then how the new attempt ended; it once kept showing "cancelled"."""
    from engine.jobs.runner import prepare_resume

    store, supervisor, job_dir = _job_without_pid(home)
    (job_dir / "cancel.request").write_text("")  # the first attempt stops at its first step
    proc, identity = _spawn_standin(home, job_dir, steps=5, step_s=0.01)
    store.set_process("finetune-test", identity.pid, identity.start_time)
    proc.wait()
    record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
    assert record.state == "cancelled" and record.finished_at is not None

    prepare_resume(job_dir)  # what `backprop resume` does before it runs the worker again
    proc, identity = _spawn_standin(home, job_dir, steps=3, step_s=1.0)
    try:
        deadline = time.time() + 30

        def starts() -> int:
            events = (job_dir / "events.jsonl").read_text().splitlines()
            return [json.loads(line)["type"] for line in events].count("started")

        while starts() < 2:
            assert time.time() < deadline, "the resumed worker never started"
            time.sleep(0.05)
        record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
        assert record.state == "running" and record.pid == identity.pid
        assert record.error is None and record.finished_at is None and record.cancel_requested_at is None
    finally:
        proc.wait(timeout=30)
    record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
    assert record.state == "succeeded"
    # A final state that no new worker reopened stays final.
    assert not store.reopen("finetune-test", "cancelled", identity.pid, identity.start_time)


def test_a_started_event_naming_an_older_process_is_not_adopted(home: Path) -> None:
    """A pid that began before the job was created is not its worker (e.g. a reused pid)."""
    from engine.contract.events import EventWriter, Started

    store, supervisor, job_dir = _job_without_pid(home)
    EventWriter(job_dir / "events.jsonl").emit(Started(kind="finetune", pid=os.getpid()))
    record = supervisor.refresh(store.get("finetune-test")).record  # type: ignore[arg-type]
    assert record.pid is None and record.state == "queued"  # still within the spawn grace


@pytest.mark.anyio
async def test_many_bad_arguments_get_a_short_answer_that_says_how_many_more(
    home: Path, dataset: Path
) -> None:
    """The SDK lists every argument that fails the schema, each with a link to pydantic's documentation;
    the answer keeps the first problems without the links, within the server's bound, and counts the rest."""
    from backprop_mcp.tool_errors import MAX_ERROR_CHARS

    bad = {
        name: "not-a-number"
        for name in ("learning_rate", "lora_rank", "lora_alpha", "micro_batch_size", "steps", "warmup_steps")
    }
    bad |= {name: ["x"] * 3 for name in ("quantization", "lr_scheduler", "grpo_sampling_graphs", "packing")}
    bad |= {name: {"a": 1} for name in ("seed", "max_seq_length", "gradient_accumulation", "grpo_top_p")}
    bad |= {
        name: -1e300 for name in ("grpo_temperature", "grpo_beta", "weight_decay", "max_grad_norm", "beta")
    }
    async with Client(make_server(home)) as client:
        text = error_text(await client.call_tool("start_finetune", {"dataset_path": str(dataset), **bad}))
    print(f"\n{len(text)} characters:\n{text[:600]}\n...\n{text[-200:]}")
    assert text.startswith("Error executing tool start_finetune: ") and "validation error" in text
    assert "errors.pydantic.dev" not in text and len(text) <= MAX_ERROR_CHARS
    assert "learning_rate" in text  # the first problems are there, whole


def test_a_long_listing_of_argument_errors_is_cut_after_a_whole_problem() -> None:
    from pydantic import ValidationError, create_model

    from backprop_mcp.tool_errors import MAX_ERROR_CHARS, compact

    many = create_model("manyArguments", **{f"setting_{i}": (int, ...) for i in range(80)})  # type: ignore[call-overload]
    try:
        many(**{f"setting_{i}": f"not a number {i}" for i in range(80)})
    except ValidationError as exc:
        text = compact(f"Error executing tool many: {exc}")
    print(f"\n{len(text)} characters, ends: {text[-160:]}")
    assert len(text) <= MAX_ERROR_CHARS and "errors.pydantic.dev" not in text
    shown = text.count("[type=int_parsing")
    assert 10 < shown < 80 and text.endswith(f"({80 - shown} more not shown: fix these and call again)")
    assert text.startswith("Error executing tool many: 80 validation errors for manyArguments\nsetting_0\n")
