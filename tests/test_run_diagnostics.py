"""engine.training.run_diagnostics and benchmarks/memory_at_peak.py: what was alive at a run's peak, and
where its second step's time went."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory_at_peak import BEFORE, live_at_peak, report  # noqa: E402

from engine.training.run_diagnostics import (  # noqa: E402
    HISTORY_ENV,
    HISTORY_STEPS,
    HISTORY_STEPS_ENV,
    PROFILE_ENV,
    PROFILE_STEP,
    environment_recording,
)


def _frames(filename: str, name: str) -> list[dict[str, object]]:
    return [
        {"filename": filename, "line": 7, "name": name},
        {"filename": "/x/benchmarks/run.py", "line": 1, "name": "main"},
    ]


def test_a_benchmark_child_records_where_it_is_asked_to(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(HISTORY_ENV, raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    env = environment_recording(str(tmp_path), "dpo-engine", profile=True)
    assert env[HISTORY_ENV] == str(tmp_path / "dpo-engine.pickle")
    assert env[PROFILE_ENV] == str(tmp_path / "dpo-engine.profile.txt")
    assert env[HISTORY_STEPS_ENV] == str(HISTORY_STEPS)
    assert environment_recording(str(tmp_path), "grpo-engine", steps=2)[HISTORY_STEPS_ENV] == "2"
    assert PROFILE_ENV not in environment_recording(str(tmp_path), "grpo-engine")  # its step 2 is timed
    assert HISTORY_ENV not in environment_recording(None, "x")  # no folder: nothing recorded


def test_a_cpu_run_writes_its_second_steps_profile_and_no_memory_history(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(HISTORY_ENV, str(tmp_path / "run.pickle"))
    monkeypatch.setenv(PROFILE_ENV, str(tmp_path / "run.profile.txt"))
    _train_tiny(tiny_model_dir, tmp_path, "cpu")
    tables = (tmp_path / "run.profile.txt").read_text()
    assert tables.startswith("step 2: ") and "by host time:" in tables and "aten::" in tables
    assert "by GPU time:" not in tables and not (tmp_path / "run.pickle").exists()


def test_the_peak_and_what_was_alive_then_are_replayed_from_the_allocator_events() -> None:
    """Torch's trace format: 100 bytes before the recording, then A and B alive together (the peak), A
    freed, a block from before the recording freed, C: peak 180 = before + A + B, by where each came from."""
    trace = [
        {
            "action": "alloc",
            "addr": 1,
            "size": 50,
            "frames": _frames("/site/engine/training/loss.py", "chunk"),
        },
        {"action": "alloc", "addr": 2, "size": 30, "frames": _frames("/site/trl/trainer/utils.py", "fused")},
        {"action": "free_requested", "addr": 1, "size": 50},
        {"action": "free_completed", "addr": 1, "size": 50},
        {"action": "free_requested", "addr": 99, "size": 40},  # allocated before the recording began
        {
            "action": "alloc",
            "addr": 3,
            "size": 10,
            "frames": _frames("/site/peft/tuners/lora/layer.py", "fwd"),
        },
    ]
    peak, groups = live_at_peak(trace, before=100)
    assert peak == 180
    assert groups == {
        "engine/training/loss.py:7 chunk  <- /x/benchmarks/run.py:1 main": 50,
        "trl/trainer/utils.py:7 fused  <- /x/benchmarks/run.py:1 main": 30,
        BEFORE: 100,
    }


def _train_tiny(tiny_model_dir: Path, tmp_path: Path, device: str) -> None:
    """Three steps of the engine's loop on the tiny model, with the environment the test set."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.contract.events import EventWriter
    from engine.data.tokenizing import Tokenized
    from engine.training.loop import train_adapter

    ids = [[(7 * i + j) % 200 + 3 for j in range(24)] for i in range(16)]

    class Resolved:  # what train_adapter reads
        steps, learning_rate, warmup_steps, lr_scheduler = PROFILE_STEP + 1, 1e-3, 0, "constant"
        micro_batch_size, gradient_accumulation, max_seq_length, packing = 2, 1, 24, False
        rows_per_step, weight_decay, max_grad_norm, seed, checkpoint_every = 2, 0.0, 1.0, 0, None

    class Tok:
        pad_token_id = 0

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    data = Tokenized(ids, [list(x) for x in ids], 0)
    with EventWriter(tmp_path / "events.jsonl") as events:
        train_adapter(model, Tok(), data, Resolved, device=device, events=events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_run_records_its_history_and_the_replayed_peak_is_the_allocators(
    tiny_model_dir, tmp_path, monkeypatch
):
    snapshot, profile = tmp_path / "run.pickle", tmp_path / "run.profile.txt"
    monkeypatch.setenv(HISTORY_ENV, str(snapshot))
    monkeypatch.setenv(HISTORY_STEPS_ENV, "2")  # two steps: Adam's moments, made after the first, in it
    monkeypatch.setenv(PROFILE_ENV, str(profile))
    _train_tiny(tiny_model_dir, tmp_path, "cuda:0")
    info = json.loads(snapshot.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["allocated_before_bytes"] > 0
    text = report(snapshot, top=10)
    replayed = float(text.split("peak ")[1].split(" GiB")[0])
    assert replayed == pytest.approx(info["peak_bytes"] / 2**30, abs=2e-3), text
    assert BEFORE in text
    tables = profile.read_text()
    assert tables.startswith(f"step {PROFILE_STEP}: ") and "by GPU time:" in tables and "aten::" in tables
