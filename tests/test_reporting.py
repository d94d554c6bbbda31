"""``report_to``: a real fine-tune of the tiny model writes TensorBoard events and an offline W&B run,
read back here with TensorBoard's own event reader and W&B's own record format."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.contract.spec import read_result

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "examples" / "data" / "chat.jsonl"
STEPS = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    home = tmp_path_factory.mktemp("report-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the defaults under test
    env.update(BACKPROP_HOME=str(home), PYTHONPATH=str(REPO))
    argv = ["train", "--data", str(CHAT), "--steps", str(STEPS), "--eval-fraction", "0.1"]
    argv += ["--report-to", "tensorboard", "--report-to", "wandb"]
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *argv], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    (job_dir,) = (home / "jobs").iterdir()
    assert read_result(job_dir).status == "succeeded"  # type: ignore[union-attr]
    return job_dir


def test_tensorboard_events_hold_the_training_curves(job: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(job / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_s", "eval/loss"} <= tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    history = read_result(job).loss_history  # type: ignore[union-attr]
    assert [round(e.value, 4) for e in loss] == [round(h["loss"], 4) for h in history]
    (held_out,) = acc.Scalars("eval/loss")
    assert held_out.step == STEPS
    assert held_out.value == pytest.approx(read_result(job).metrics["eval_loss"], rel=1e-5)  # type: ignore[union-attr]


def _wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a ``.wandb`` file: W&B's header, then LevelDB-log framing (32 KiB blocks of
    crc32 + length + type chunks). wandb >= 0.19 writes it from its Go core and ships no Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            yield body
        elif kind == 2:  # FIRST
            pending = body
        elif kind == 3:  # MIDDLE
            pending += body
        elif kind == 4:  # LAST
            yield pending + body


def test_wandb_logs_offline_into_the_job_folder(job: Path) -> None:
    from wandb.proto import wandb_internal_pb2

    (run_dir,) = (job / "wandb").glob("offline-run-*")  # offline: nothing was sent anywhere
    (log,) = run_dir.glob("run-*.wandb")
    history: list[dict[str, object]] = []
    config: dict[str, object] = {}
    for raw in _wandb_records(log):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif record.WhichOneof("record_type") == "run":
            updates = record.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates})
            assert record.run.display_name == job.name
    steps = [h for h in history if "train/loss" in h]
    assert [h["_step"] for h in steps] == list(range(1, STEPS + 1))
    # a number on every step (wandb writes a whole-valued float such as 580.0 as the JSON integer 580)
    assert all(
        isinstance(h["train/tokens_per_s"], (int, float)) and h["train/tokens_per_s"] > 0 for h in steps
    )
    assert any("eval/loss" in h for h in history)
    assert config.get("model") == "tiny" and config.get("kind") == "finetune"
