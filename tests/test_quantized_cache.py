"""The 4-bit copy of a base model that a QLoRA job keeps for the next ones (engine.training.quantized_cache):
real jobs in real workers on the tiny model, NF4 through bitsandbytes' CPU backend (the GPU path runs the
same code; only bitsandbytes' kernels differ)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.contract.events import Progress, read_events
from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings, read_result
from engine.jobs.runner import create_job
from engine.training import quantized_cache

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"

pytest.importorskip("bitsandbytes")


def _job(model: Path, root: Path, keep: bool = True, device: str = "cpu") -> tuple[list[float], str]:
    spec = FinetuneSpec(
        model=str(model), quantization="4bit", keep_quantized=keep, lora=LoraSettings(rank=4), device=device,
        train=TrainSettings(steps=2, micro_batch_size=4, gradient_accumulation=1, max_seq_length=128),
        dataset=DatasetSettings(path=str(CHAT)),
    )  # fmt: skip
    job_dir = create_job(spec, root=root)
    done = subprocess.run([sys.executable, "-m", "engine", "run", str(job_dir)], cwd=ROOT, timeout=600,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_result(job_dir).status == "succeeded"
    events = read_events(job_dir / "events.jsonl")[0]
    loaded = next(e.message for e in events if e.type == "log" and e.message.startswith("model loaded"))
    return [e.loss for e in events if isinstance(e, Progress) and e.loss is not None], loaded


def test_a_second_job_loads_the_4bit_copy_the_first_kept_and_trains_the_same(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first, said = _job(model, tmp_path / "jobs")
    assert "quantized now; a 4-bit copy is kept after this job" in said, said
    (entry,) = [p for p in quantized_cache.cache_root().iterdir() if p.is_dir()]
    assert entry.name.endswith("-fp32") and (entry / "config.json").exists()
    assert quantized_cache.lookup(model, "fp32") == entry

    second, said = _job(model, tmp_path / "jobs")
    assert f"the 4-bit copy kept by an earlier job ({entry})" in said, said
    assert second == first  # the same codes and scales: the same losses, exactly

    # a damaged copy costs its speed-up, not the job: it is removed, the weights load as usual, and the
    # job keeps a new copy
    (entry / "model.safetensors").write_bytes(b"not safetensors")
    again, said = _job(model, tmp_path / "jobs")
    assert f"the kept 4-bit copy {entry} did not load" in said and "quantized now" in said, said
    assert again == first and quantized_cache.lookup(model, "fp32") == entry

    # the key is the weights' contents: changed weights are a miss (and get their own copy after the job)
    from safetensors.torch import load_file, save_file

    (weights,) = quantized_cache.weight_files(model)
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("down_proj.weight"))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert quantized_cache.lookup(model, "fp32") is None
    third, said = _job(model, tmp_path / "jobs")
    assert "quantized now" in said and third != first
    assert len([p for p in quantized_cache.cache_root().iterdir() if p.is_dir()]) == 2

    # so is an edited config with the same weights (the copy keeps the config it was loaded with)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"edited_for_the_test": True}))
    _, said = _job(model, tmp_path / "jobs")
    assert "quantized now" in said, said
    assert len([p for p in quantized_cache.cache_root().iterdir() if p.is_dir()]) == 3


def test_no_copy_when_turned_off(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, said = _job(tiny_model_dir, tmp_path / "jobs", keep=False)
    assert "4-bit copy" not in said
    assert not quantized_cache.cache_root().exists() or not any(quantized_cache.cache_root().iterdir())


def test_the_copy_is_written_whole_or_not_at_all(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails midway leaves no entry (nor its temporary folder); the job was done already, so
    the failure is only reported."""
    from transformers import AutoModelForCausalLM

    from engine.training.base_model import bnb_nf4_config

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir,
        dtype=torch.float32,
        device_map={"": "cpu"},
        quantization_config=bnb_nf4_config("fp32"),
    )
    assert quantized_cache.keep_after_job(model, tiny_model_dir, "fp32") is None  # not in a job's worker
    monkeypatch.setattr(quantized_cache, "_IN_WORKER", [True])
    pending = quantized_cache.keep_after_job(model, tiny_model_dir, "fp32")
    assert pending is not None
    assert quantized_cache.keep_after_job(model, tiny_model_dir, "fp32") is None  # planned once a process

    def broken(tensors: object, folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(quantized_cache, "_write_shards", broken)
    quantized_cache.write_pending()
    assert pending.error == "OSError: disk full"
    assert [p.name for p in quantized_cache.cache_root().iterdir()] == ["index.json"]
    assert quantized_cache.lookup(tiny_model_dir, "fp32") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_a_second_job_loads_the_copy_the_first_kept_and_trains_the_same(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same on a card: bitsandbytes' CUDA kernels quantized the first job's weights, the second job loads
    those codes (bf16 compute) and its steps give the same losses."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first, said = _job(model, tmp_path / "jobs", device="cuda")
    assert "quantized now" in said, said
    second, said = _job(model, tmp_path / "jobs", device="cuda")
    assert "the 4-bit copy kept by an earlier job" in said and said.rstrip(")").endswith("-bf16"), said
    assert second[0] == first[0]  # the same codes and scales: the same first forward pass
    assert second == pytest.approx(first, rel=1e-3)  # (flash attention's backward may add in another order)


def test_the_folder_keeps_the_most_recently_used_copies(tmp_path: Path) -> None:
    """Loading a copy counts as using it; beyond ``KEPT_COPIES`` the least recently used go first."""
    import os

    root = quantized_cache.cache_root()
    root.mkdir(parents=True)
    copies = []
    for i in range(3):
        model = tmp_path / f"model-{i}"
        model.mkdir()
        (model / "model.safetensors").write_bytes(bytes([i]) * 64)
        digest = quantized_cache._hash_file(model / "model.safetensors")
        quantized_cache._remember({model / "model.safetensors": digest})
        entry = quantized_cache._entry([digest], "bf16")
        entry.mkdir()
        (entry / "config.json").write_text("{}")
        os.utime(entry, ns=(i * 10**9, i * 10**9))  # made one after another
        copies.append((model, entry))
    assert quantized_cache.lookup(copies[0][0], "bf16") == copies[0][1]  # the oldest, used now
    assert quantized_cache._evict(keep=2) == [copies[1][1]]
    assert quantized_cache.lookup(copies[1][0], "bf16") is None
    assert quantized_cache.lookup(copies[0][0], "bf16") == copies[0][1]
    assert quantized_cache.lookup(copies[2][0], "bf16") == copies[2][1]


def test_a_model_in_the_hubs_cache_is_keyed_by_its_blobs_names_without_hashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub's cache keeps a weight file as ``blobs/<sha256>`` linked from its snapshot: that name is the
    hash (a folder elsewhere with the same bytes gets the same key), so nothing is read to make it."""
    import hashlib

    weights, config = b"weights" * 1000, b'{"model_type": "qwen2"}'
    blobs = tmp_path / "models--org--name" / "blobs"
    blobs.mkdir(parents=True)
    blob = blobs / hashlib.sha256(weights).hexdigest()
    blob.write_bytes(weights)
    (blobs / ("c" * 40)).write_bytes(config)  # a small file: git's 40-digit name, hashed as usual
    snapshot = tmp_path / "models--org--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)
    (snapshot / "config.json").symlink_to(blobs / ("c" * 40))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(weights)
    (plain / "config.json").write_bytes(config)

    real_hash = quantized_cache._hash_file
    read: list[Path] = []
    monkeypatch.setattr(
        quantized_cache, "_hash_file", lambda path: read.append(path.resolve()) or real_hash(path)
    )
    pending = quantized_cache.PendingCopy(snapshot, "bf16", {}, "{}")
    pending.hash_in_background()
    pending._thread.join()  # type: ignore[union-attr]
    assert pending.error is None and blob not in read  # the weights were not read; the config was
    assert pending.hashes == [blob.name, hashlib.sha256(config).hexdigest()]
    entry = quantized_cache._entry(pending.hashes, "bf16")
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    assert quantized_cache.lookup(snapshot, "bf16") == entry
    other = quantized_cache.PendingCopy(plain, "bf16", {}, "{}")  # the same bytes outside the hub's cache
    other.hash_in_background()
    other._thread.join()  # type: ignore[union-attr]
    assert other.hashes == pending.hashes
