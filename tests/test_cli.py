"""The ``backprop`` command line as a person meets it: real subprocesses, real jobs on the tiny model.

Each command runs as ``python -m engine.cli.main`` in a child process with its own state folder, as a
user's shell would run ``backprop``: what is printed, the exit codes, and which files exist after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.api import TrainResult
from engine.contract.events import read_events
from engine.contract.spec import read_result

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "examples" / "data" / "chat.jsonl"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One state folder for the module: the tiny model is built once, each job has its own folder."""
    return tmp_path_factory.mktemp("cli-home")


def backprop(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout,
        check=False,
    )


def job_dirs(home: Path) -> list[Path]:
    root = home / "jobs"
    return sorted(root.iterdir()) if root.is_dir() else []


@pytest.fixture
def bad_data(tmp_path: Path) -> Path:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"question": "no known field"}) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(home: Path) -> Path:
    """One finished fine-tune of the tiny model (2 steps, with a held-out split), shared by the checks."""
    done = backprop(home, "train", "--data", str(CHAT), "--steps", "2", "--eval-fraction", "0.1")
    assert done.returncode == 0, done.stderr
    return job_dirs(home)[-1]


def test_gpu_prints_a_table_of_presets(home: Path) -> None:
    done = backprop(home, "gpu")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "preset" in out and "model" in out
    for preset in ("tiny", "qwen2.5-7b", "llama3.2-1b"):
        assert preset in out
    assert "No usable NVIDIA GPU" in out or "micro-batch" in out  # said plainly either way
    assert not out.lstrip().startswith("{")
    report = json.loads(backprop(home, "gpu", "--json").stdout)
    assert {p["preset"] for p in report["presets"]} >= {"tiny", "qwen2.5-7b"}
    assert isinstance(report["available"], bool)


def test_check_data_exits_nonzero_on_bad_rows_and_names_the_flag(home: Path, bad_data: Path) -> None:
    bad = backprop(home, "check-data", str(bad_data))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "bad.jsonl:2" in bad.stdout
    assert "--skip-bad-rows" in bad.stdout and "skip_bad_rows" not in bad.stdout
    good = backprop(home, "check-data", str(CHAT))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "160 of 160 rows usable" in good.stdout and "ready to train" in good.stdout
    assert json.loads(backprop(home, "check-data", str(CHAT), "--json").stdout)["report"]["rows_ok"] == 160


@pytest.mark.parametrize(
    ("method", "said"),
    [("sft", "an sft"), ("dpo", "a dpo"), ("kto", "a kto"), ("orpo", "an orpo"), ("grpo", "a grpo")],
)
def test_check_data_names_the_method_with_its_article(method: str, said: str) -> None:
    from engine.cli.show import check_data_text
    from engine.planning.preflight import DataCheck

    out = DataCheck(
        report={"path": "pairs.jsonl", "format": "preference", "rows_ok": 4, "rows_total": 4},
        method=method, fits=True, device="cpu",
        defaults={"steps": 10, "micro_batch_size": 2, "gradient_accumulation": 1, "max_seq_length": 64, "learning_rate": 1e-4},
    )  # fmt: skip
    assert f"\n{said} fine-tune would use: 10 steps" in check_data_text(out, "tiny")


def test_bad_data_is_refused_before_any_job_exists(home: Path, bad_data: Path) -> None:
    before = job_dirs(home)
    done = backprop(home, "train", "--data", str(bad_data), "--steps", "2")
    assert done.returncode == 2
    assert "--skip-bad-rows" in done.stderr and "skip_bad_rows" not in done.stderr
    assert job_dirs(home) == before  # no job folder, no worker


def test_train_prints_summaries_for_people(home: Path, trained: Path) -> None:
    log = (trained / "events.jsonl").read_text()
    assert "model loaded: tiny, " in log and "{'model'" not in log
    result = read_result(trained)
    assert result is not None and result.status == "succeeded"
    # the same command again, to read what a person sees
    done = backprop(home, "train", "--data", str(CHAT), "--steps", "2")
    assert done.returncode == 0, done.stderr
    assert "model loaded: tiny, " in done.stderr and "parameters" in done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("done: 2 steps in ") and "loss " in lines[0]
    assert any(line.startswith("adapter: ") and line.endswith("/adapter") for line in lines)
    assert any("backprop export " in line for line in lines)
    assert not done.stdout.lstrip().startswith("{")


def test_train_json_is_events_then_the_result(home: Path) -> None:
    done = backprop(home, "train", "--data", str(CHAT), "--steps", "2", "--json")
    assert done.returncode == 0, done.stderr
    objects = [json.loads(line) for line in done.stdout.splitlines()]
    assert objects[-1]["status"] == "succeeded" and objects[-1]["artifacts"]["adapter"]
    assert {o["type"] for o in objects[:-1]} >= {"started", "progress", "finished"}


def test_result_repr_is_short(trained: Path) -> None:
    raw = read_result(trained)
    assert raw is not None
    result = TrainResult(
        job_dir=trained,
        adapter_path=Path(raw.artifacts["adapter"]),
        metrics=raw.metrics,
        loss_history=raw.loss_history,
        artifacts=raw.artifacts,
        raw=raw,
    )
    text = repr(result)
    assert "\n" not in text and len(text) < 300, text
    assert trained.name in text and "loss=" in text and "adapter=" in text


def _wait_for(predicate, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT as a terminal's Ctrl-C does")
def test_ctrl_c_then_resume_continues_from_the_checkpoint(home: Path) -> None:
    before = set(job_dirs(home))
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli.main", "train", "--data", str(CHAT), "--steps", "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO),
        start_new_session=True,  # its own process group, as a terminal gives a command
        # a shell running this test in the background ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _wait_for(lambda: set(job_dirs(home)) - before)
    (job,) = set(job_dirs(home)) - before
    log = job / "events.jsonl"
    _wait_for(lambda: log.is_file() and '"type":"progress"' in log.read_text(errors="replace"))
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the job checkpoints and stops
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert read_result(job).status == "cancelled"  # type: ignore[union-attr]
    assert "backprop resume" in err

    done = backprop(home, "resume", job.name)
    assert done.returncode == 0, done.stderr
    first = next(line for line in done.stderr.splitlines() if line.startswith("resuming"))
    assert f"resuming {job.name} (it had ended cancelled): from the checkpoint at step " in first
    assert first.endswith(" of 40")
    assert done.stdout.startswith("done: 40 steps")
    result = read_result(job)
    assert result is not None and result.status == "succeeded" and result.metrics["steps"] == 40
    assert [h["step"] for h in result.loss_history] == list(range(1, 41))  # no step lost or repeated
    events, _ = read_events(job / "events.jsonl")
    assert any(e.type == "log" and "resumed from checkpoint" in e.message for e in events)
    again = backprop(home, "resume", job.name)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_export_an_adapter_folder_into_an_output_dir(home: Path, trained: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "output" / "lora"  # where users of other tools keep adapters
    adapter.parent.mkdir()
    shutil.copytree(trained / "adapter", adapter)
    out = tmp_path / "gguf"
    done = backprop(home, "export", str(adapter), "--quantization", "q8_0", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "lora-q8_0.gguf"]  # nothing partial
    assert "FROM ./lora-q8_0.gguf" in (out / "Modelfile").read_text()
    assert str(out / "lora-q8_0.gguf") in done.stdout and "verified" in done.stdout
    job = [d for d in job_dirs(home) if d.name.startswith("exp-")][-1]
    assert not list((job / "gguf").glob("*.gguf"))  # moved, not copied
    assert read_result(job).artifacts["gguf_q8_0"] == str(out / "lora-q8_0.gguf")  # type: ignore[union-attr]


def test_export_refuses_a_folder_that_is_no_adapter(home: Path, tmp_path: Path) -> None:
    before = job_dirs(home)
    done = backprop(home, "export", str(tmp_path), "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "adapter_config.json" in done.stderr
    assert job_dirs(home) == before


def test_gpu_table_on_a_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: NVML's answer is replaced by an H200's (as measured on one); the preset fitting
    and the table are the real code."""
    from engine.cli.show import gpu_text
    from engine.hardware.gpus import GpuInfo, GpuProbe
    from engine.planning import gpu_report as gpu

    h200 = GpuInfo(0, "NVIDIA H200", 143771, 142900, 871, 0, 31, 74.0, 700.0, "9.0", True, "570.86", "12.8")
    monkeypatch.setattr("engine.hardware.gpus.probe_gpus", lambda: GpuProbe(available=True, gpus=[h200]))
    text = gpu_text(gpu.gpu_report())
    assert text.startswith("GPU 0: NVIDIA H200, 139.6 of 140.4 GiB free, 31 °C")
    rows = {
        line.split()[0]: line.split()
        for line in text.splitlines()
        if line.startswith(("qwen", "llama", "tiny"))
    }
    assert rows["qwen2.5-7b"][2] == "yes" and rows["qwen2.5-7b"][3] == "16"  # fits, largest micro-batch
    assert "GiB" in rows["qwen2.5-7b"]


def test_gpus_flag_picks_the_cards_and_refuses_what_is_not_a_card_list(home: Path) -> None:
    from engine.cli.main import _spec, build_parser

    def spec(*flags: str) -> object:
        return _spec(build_parser().parse_args(["train", "--data", str(CHAT), *flags]))

    assert spec("--gpus", "0,1").gpus == [0, 1]  # type: ignore[attr-defined]
    assert spec("--gpus", "ALL").gpus == "all"  # type: ignore[attr-defined]
    assert spec("--gpus", "0,1", "--parallel", "fsdp").parallel == "fsdp"  # type: ignore[attr-defined]
    one = spec("--gpus", "1")
    assert one.gpus == [1] and one.gpu_index == 1  # type: ignore[attr-defined]
    series = build_parser().parse_args(["multi-run", "--data", str(CHAT), "--num-runs", "2", "--gpus", "2"])
    assert _spec(series).gpu_index == 2

    before = job_dirs(home)
    bad = backprop(home, "train", "--data", str(CHAT), "--gpus", "0 and 1")
    assert bad.returncode == 2 and "--gpus 0,1" in bad.stderr and "separated by commas" in bad.stderr
    twice = backprop(home, "train", "--data", str(CHAT), "--gpus", "0,0")
    assert twice.returncode == 2
    assert "--gpus 0,0 must list each card once, e.g. --gpus 0,1 (or --gpus all)" in twice.stderr
    assert job_dirs(home) == before  # refused before any job folder exists
