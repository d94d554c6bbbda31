"""The contract between the server, the CLI, the API and the worker: one definition of each thing.

Each test here pins a seam that once drifted (Ctrl-C then ``backprop resume`` is tested through the
real CLI in test_cli.py): the events' fields, what the preflight accepts,
how a worker is started (its own session, never the caller's folder on sys.path), the device lock
of an export, and the server's single, torch-free door into the engine.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

from backprop_mcp.job_events import JobTail
from backprop_mcp.job_views import progress_of
from engine.contract import events as ev
from engine.contract.spec import DatasetSettings, ExportSpec, FinetuneSpec, read_result
from engine.jobs.runner import create_job, request_cancel, start_worker
from engine.planning.preflight import PreflightError, preflight, spell

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_series_progress_counts_runs_and_the_loss_axis_is_global(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with ev.EventWriter(path) as w:
        for run in (1, 2):
            for step in (1, 2):
                w.emit(
                    ev.Progress(
                        run=run, runs=2, step=step, total=2, global_step=(run - 1) * 2 + step, loss=1.0
                    )
                )
            w.emit(ev.Eval(global_step=run * 2, loss=0.5, examples=3, run=run))
    tail = JobTail(path)
    tail.poll()
    assert [x for x, _ in tail.loss] == [1, 2, 3, 4] and tail.run_starts == [0, 2]
    assert tail.eval_loss == [(2.0, 0.5), (4.0, 0.5)]
    progress = progress_of(tail)
    assert progress is not None and progress.fraction == 1.0 and progress.num_runs == 2


def test_an_unknown_event_fails_loudly_in_strict_mode(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"seq": 1, "time": 0, "type": "progress", "step": 1, "total": 2, "num_runs": 3}\n')
    with pytest.raises(ev.EventFormatError, match="num_runs"):
        ev.read_events(path)


def test_preflight_refuses_an_adapter_folder_as_model_and_names_options_per_caller(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\nnot json\n')
    spec = FinetuneSpec(model=str(adapter), dataset=DatasetSettings(path=str(data)))
    with pytest.raises(PreflightError, match="adapter folder"):
        preflight(spec, "tool")
    spec = FinetuneSpec(model="tiny", dataset=DatasetSettings(path=str(data)))
    with pytest.raises(PreflightError, match="--skip-bad-rows"):
        preflight(spec, "cli")
    with pytest.raises(PreflightError, match="skip_bad_rows=true"):
        preflight(spec, "tool")
    assert spell("skip_bad_rows", True, "python") == "skip_bad_rows=True"
    with pytest.raises(PreflightError, match="did you mean 'qwen2.5-7b'"):
        preflight(FinetuneSpec(model="qwen2.5-7bb", dataset=DatasetSettings(path=str(data))), "tool")


def _wait_for(path: Path, text: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_an_export_waits_for_the_device_lock_and_a_queued_job_can_be_cancelled(tmp_path: Path) -> None:
    """Export holds the device lock like training (here the CPU's: this machine has no GPU)."""
    from engine.jobs.worker import device_lock_paths

    spec = ExportSpec(source=str(tmp_path))
    held = FileLock(str(device_lock_paths(spec)[0]))
    held.acquire()
    try:
        job_dir = create_job(spec, root=tmp_path / "jobs")
        proc, _ = start_worker(job_dir)
        _wait_for(job_dir / "events.jsonl", '"queued"')
        request_cancel(job_dir)
        assert proc.wait(timeout=60) == 2
    finally:
        held.release()
    result = read_result(job_dir)
    assert result is not None and result.status == "cancelled"


def test_the_worker_never_imports_the_callers_own_engine_package(tmp_path: Path) -> None:
    """A user's folder with its own ``engine/`` package: the worker still runs ours (-P, cwd=job folder)."""
    poisoned = tmp_path / "project"
    (poisoned / "engine").mkdir(parents=True)
    (poisoned / "engine" / "__init__.py").write_text("raise SystemExit('the user engine was imported')\n")
    data = tmp_path / "bad.jsonl"
    data.write_text("not json\n")
    job_dir = create_job(
        FinetuneSpec(model="tiny", dataset=DatasetSettings(path=str(data))), root=tmp_path / "j"
    )
    code = (
        "import sys; from engine.jobs.runner import run_and_follow; from pathlib import Path; "
        f"r = run_and_follow(Path({str(job_dir)!r}), lambda e: None); print(r.error['type'])"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=poisoned, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.stdout.strip() == "PreflightError", (done.stdout, done.stderr)
    assert "user engine" not in (job_dir / "worker.log").read_text()


def test_the_server_uses_only_the_declared_engine_interface_and_it_is_torch_free() -> None:
    for module in (REPO / "backprop_mcp").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert not name.startswith("engine") or name == "engine.interface", (module.name, name)
    code = "import sys, engine.interface; print(json.dumps(sorted({'torch','transformers','peft'} & set(sys.modules))))"
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert json.loads(out.stdout) == []


@pytest.mark.anyio
async def test_tool_arguments_agree_with_the_spec_models() -> None:
    """Every tool argument that sets a spec field has that field's default and bounds (one source of truth)."""
    from mcp import Client

    from backprop_mcp.server import build_server
    from engine.contract.spec import LoraSettings, SeriesSpec, TrainSettings

    def flat(schema: dict) -> dict:
        return {
            k: v
            for k, v in schema.items()
            if k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        }

    def spec_schema(model: type, name: str) -> dict:
        prop = model.model_json_schema()["properties"][name]
        options = prop.get("anyOf", [prop])
        return {k: v for o in options for k, v in flat(o).items()}

    fields = {
        **{n: (TrainSettings, n) for n in TrainSettings.model_fields},
        **{n: (DatasetSettings, n) for n in ("skip_bad_rows", "eval_fraction")},
        **{
            n: (SeriesSpec, n)
            for n in SeriesSpec.model_fields
            if n not in ("datasets", "lora", "train", "safety")
        },
        "lora_rank": (LoraSettings, "rank"),
        "lora_alpha": (LoraSettings, "alpha"),
    }
    async with Client(build_server()) as client:
        tools = (await client.list_tools()).tools
    checked = 0
    for tool in (t for t in tools if t.name in ("start_finetune", "run_slao_series", "check_dataset")):
        for arg, schema in tool.input_schema.get("properties", {}).items():
            if arg not in fields:
                continue
            model, name = fields[arg]
            options = schema.get("anyOf", [schema])
            assert {k: v for o in options for k, v in flat(o).items()} == spec_schema(model, name), (
                tool.name,
                arg,
            )
            default = model.model_fields[name].get_default(call_default_factory=True)
            assert schema.get("default") == default, (tool.name, arg, schema.get("default"), default)
            checked += 1
    assert checked >= 20


@pytest.mark.anyio
async def test_every_setting_is_reachable_from_the_cli_the_api_and_the_tools(tmp_path: Path) -> None:
    """The spec's settings (``settings_of``) are the CLI's flags, the API's keywords and the tools'
    arguments (less the listed ones), all built into a spec by the one ``training_spec``."""
    from mcp import Client

    from backprop_mcp.server import build_server
    from backprop_mcp.tooling import LEFT_OUT
    from engine.api import Trainer
    from engine.cli.main import _spec, build_parser
    from engine.contract.settings import settings_of
    from engine.contract.spec import SeriesSpec

    async with Client(build_server()) as client:
        tools = {t.name: set(t.input_schema["properties"]) for t in (await client.list_tools()).tools}
    for command, model, tool in (
        ("train", FinetuneSpec, "start_finetune"),
        ("multi-run", SeriesSpec, "run_slao_series"),
    ):
        names = set(settings_of(model))
        flags = set(vars(build_parser().parse_args([command, "--data", "d.jsonl"])))
        assert names - flags == {"lora_target_modules"}, command  # a list: the API's and the spec file's
        assert names - tools[tool] == LEFT_OUT[tool] and {"model", "lora_rank", "quantization"} <= tools[tool]
    export = vars(build_parser().parse_args(["export", "job"]))
    assert set(ExportSpec.model_fields) - set(export) == {"kind"}
    assert set(settings_of(ExportSpec)) - tools["export_gguf"] == LEFT_OUT["export_gguf"]
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert all(
        "--json" in sub.format_help() for name, sub in commands.items() if name not in ("run", "serve")
    )
    cli = _spec(
        build_parser().parse_args(
            ["train", "--data", "d.jsonl", "--lr", "0.001", "--lora-rank", "4", "--no-packing",
             "--report-to", "wandb", "--max-pause-s", "5", "--skip-bad-rows", "--split", "dev"]
        )
    )  # fmt: skip
    assert (cli.train.learning_rate, cli.lora.rank, cli.train.packing, cli.train.report_to) == (
        0.001, 4, False, ["wandb"],
    )  # fmt: skip
    assert (cli.safety.max_pause_s, cli.dataset.skip_bad_rows, cli.dataset.split) == (5, True, "dev")
    with pytest.raises(TypeError, match="did you mean 'learning_rate'"):
        Trainer("tiny", learning_rat=0.1)
    with pytest.raises(TypeError, match="unknown setting 'eval_fraction'"):  # a series holds out its own
        Trainer("tiny", workdir=tmp_path).multi_run("d.jsonl", eval_fraction=0.1)
