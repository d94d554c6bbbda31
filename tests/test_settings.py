"""A setting is declared once, as a field of the spec models (engine/contract/spec.py), and every surface
takes it from there: the tools' input schemas, the CLI's flags, ``Trainer``'s signature, the resolved plan
the loop runs, ``check-data``'s arguments.

The proof edits nothing but spec.py: a child process loads a copy of it with one more training setting
and one more section, then reads them back from each surface.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.contract.settings import settings_of, training_spec
from engine.contract.spec import FinetuneSpec, SeriesSpec

REPO = Path(__file__).resolve().parents[1]

# Runs in a child: spec.py, plus a field in TrainSettings and a new section on every training job.
PROBE = r"""
import ast, contextlib, inspect, io, json, sys, types
from pathlib import Path

import anyio

import engine.contract.files  # what spec.py imports, loaded as usual

path = Path("engine/contract/spec.py")
source = path.read_text()
classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}
lines = source.splitlines(keepends=True)
def last_field(name):
    return max(n.end_lineno for n in classes[name].body if isinstance(n, ast.AnnAssign))
additions = sorted([  # bottom first, so that the line numbers above stay right
    (last_field("_ModelJob"), "    probe: ProbeSettings = Field(default_factory=ProbeSettings)\n"),
    (classes["_ModelJob"].lineno - 1, "class ProbeSettings(_Strict):\n    probe_strength: float = "
        "Field(0.5, gt=0, le=1, description='a section added by a test')\n    probe_note: str | None = None\n\n\n"),
    (last_field("TrainSettings"), "    probe_setting: int = Field(3, ge=1, le=9, description='a setting added by a test')\n"),
], reverse=True)
for at, text in additions:
    lines.insert(at, text)
spec = types.ModuleType("engine.contract.spec")
spec.__file__ = str(path)
sys.modules["engine.contract.spec"] = spec
exec(compile("".join(lines), str(path), "exec"), spec.__dict__)

from mcp import Client
from backprop_mcp.server import build_server
from engine.api import Trainer
from engine.cli.main import _spec, build_parser
from engine.jobs.commands import run_oneshot
from engine.models.presets import get_preset
from engine.planning.defaults import resolve_training

out = {}

async def tools():
    async with Client(build_server()) as client:
        listed = {t.name: t.input_schema["properties"] for t in (await client.list_tools()).tools}
        refused = await client.call_tool("start_finetune", {"dataset_path": "/nonexistent.jsonl", "probe_setting": 10})
    return listed, refused.is_error, str(refused.content[0].text)

listed, out["tool_refused"], out["tool_message"] = anyio.run(tools)
out["tools"] = {name: {k: props.get(k) for k in ("probe_setting", "probe_strength", "probe_note")} for name, props in listed.items()}
help_text = io.StringIO()
with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
    build_parser().parse_args(["train", "--help"])
out["train_help"] = " ".join(help_text.getvalue().split())
cli = _spec(build_parser().parse_args(["train", "--data", "d.jsonl", "--probe-setting", "5", "--probe-strength", "0.25"]))
out["cli_spec"] = [cli.train.probe_setting, cli.probe.probe_strength]
for method in (Trainer.train, Trainer.multi_run):
    param = inspect.signature(method).parameters["probe_setting"]
    out.setdefault("trainer", []).append([param.default, str(param.annotation)])
resolved = resolve_training(
    spec.TrainSettings(probe_setting=7), n_examples=2, token_lengths=[10, 20], shape=get_preset("tiny").shape,
    quantization="none", lora_rank=4, device="cpu", free_memory_gib=None,
)
out["resolved"] = [resolved.probe_setting, resolved.reasons["probe_setting"]]
printed = io.StringIO()
with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
    run_oneshot("check-data", json.dumps({"path": "/nonexistent.jsonl", "probe_setting": 0}))
out["check_data"] = json.loads(printed.getvalue())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_setting_added_to_the_spec_is_a_tool_argument_with_its_bounds(probe: dict) -> None:
    for tool in ("start_finetune", "run_slao_series"):
        assert probe["tools"][tool]["probe_setting"] == {
            "default": 3, "description": "a setting added by a test", "maximum": 9, "minimum": 1,
            "title": "Probe Setting", "type": "integer",
        }  # fmt: skip
        assert probe["tools"][tool]["probe_strength"]["exclusiveMinimum"] == 0  # a new section's too
        assert probe["tools"][tool]["probe_note"]["anyOf"][0] == {
            "maxLength": 4096,
            "type": "string",
        }  # text: bounded
    assert set(probe["tools"]["check_dataset"].values()) == {None}  # it takes its own few
    assert probe["tool_refused"] and "probe_setting" in probe["tool_message"]  # the bound, enforced


def test_a_setting_added_to_the_spec_is_a_cli_flag_a_trainer_keyword_and_in_the_plan(probe: dict) -> None:
    assert "--probe-setting PROBE_SETTING a setting added by a test (default 3)" in probe["train_help"]
    assert "probe settings: --probe-strength" in probe["train_help"]  # a new section: its own group
    assert probe["cli_spec"] == [5, 0.25]
    for default, annotation in probe["trainer"]:  # Trainer.train and Trainer.multi_run
        assert default == 3 and "a setting added by a test" in annotation and "Le(le=9)" in annotation
    assert probe["resolved"] == [7, "given"]  # the resolved plan the loop gets carries it, typed
    error = probe["check_data"]["error"]  # check-data's arguments are the spec's: its bounds refuse 0
    assert error["type"] == "ValidationError" and "probe_setting" in error["message"]


def test_flat_settings_go_where_the_spec_declares_them() -> None:
    spec = training_spec(SeriesSpec, ["a.jsonl", "b.jsonl"], lora_rank=4, split="dev", steps=3, seed=None)
    assert (spec.lora.rank, spec.train.steps, spec.train.seed) == (4, 3, 42)  # None: the spec's default
    assert [d.split for d in spec.datasets] == ["dev", "dev"]
    assert "eval_fraction" in settings_of(FinetuneSpec) and "eval_fraction" not in settings_of(SeriesSpec)
    assert not {"kind", "path", "dataset", "datasets", "lora", "train"} & set(settings_of(SeriesSpec))
    with pytest.raises(TypeError, match="did you mean 'max_seq_length'"):
        training_spec(FinetuneSpec, "a.jsonl", max_seq_len=512)
