"""A job on several devices: DDP ranks through torchrun, here two CPU ranks over gloo on the tiny model.

Real processes end to end (the worker, torchrun, two ranks); no GPU exists here, so the NCCL path
and the per-card locks of a GPU machine are not exercised.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from engine.contract.events import read_events
from engine.contract.spec import (
    CHECKPOINT_DIR,
    DatasetSettings,
    FinetuneSpec,
    LoraSettings,
    TrainSettings,
    read_result,
)
from engine.jobs.runner import create_job, prepare_resume, request_cancel

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"


def _spec(
    tiny_model_dir: Path,
    gpus: list[int] | None,
    parallel: str = "auto",
    held_out: float = 0.0,
    **train: object,
) -> FinetuneSpec:
    settings = {
        "learning_rate": 3e-3,
        "micro_batch_size": 1,
        "gradient_accumulation": 4,
        "max_seq_length": 128,
        "steps": 3,
        "packing": False,
        **train,
    }
    return FinetuneSpec(
        model=str(tiny_model_dir),
        device="cpu",
        quantization="none",  # fp32: the two runs must agree to float noise
        gpus=gpus,
        parallel=parallel,  # type: ignore[arg-type]
        lora=LoraSettings(rank=8),
        train=TrainSettings(**settings),
        dataset=DatasetSettings(path=str(CHAT), eval_fraction=held_out),
    )


def _run(job_dir: Path) -> int:
    env_cmd = [sys.executable, "-m", "engine", "run", str(job_dir)]
    return subprocess.run(env_cmd, cwd=ROOT, timeout=600, stderr=subprocess.DEVNULL).returncode


def test_gpus_setting_is_validated():
    with pytest.raises(ValidationError, match="each card once"):
        FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[0, 0])
    with pytest.raises(ValidationError, match="not both"):
        FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[0, 1], gpu_index=1)
    with pytest.raises(ValidationError, match="shards the model over several cards"):
        FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[0], parallel="fsdp")
    with pytest.raises(ValidationError, match="backend 'native' or 'auto'"):
        FinetuneSpec(
            dataset=DatasetSettings(path="x.jsonl"), gpus="all", train=TrainSettings(backend="unsloth")
        )
    one = FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[3])  # one card: the one-device path
    assert one.gpu_index == 3
    assert FinetuneSpec.model_validate_json(one.model_dump_json()).gpu_index == 3


def test_a_job_on_several_cards_locks_each_in_sorted_order(monkeypatch):
    """No GPU here: NVML's answer is replaced by two cards; the lock choice is the real code."""
    from engine.hardware.gpus import GpuInfo, GpuProbe
    from engine.jobs.worker import device_lock_paths

    cards = [
        GpuInfo(i, "NVIDIA H200", 143771, 142900, 871, 0, 31, 74.0, 700.0, "9.0", True, "570.86", "12.8")
        for i in (0, 1)
    ]
    monkeypatch.setattr("engine.hardware.gpus.probe_gpus", lambda: GpuProbe(available=True, gpus=cards))
    spec = FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[1, 0])
    assert [p.stem for p in device_lock_paths(spec)] == ["gpu-0", "gpu-1"]
    every = FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus="all")
    assert [p.stem for p in device_lock_paths(every)] == ["gpu-0", "gpu-1"]
    one = FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[1])
    assert [p.stem for p in device_lock_paths(one)] == ["gpu-1"]
    cpu = FinetuneSpec(dataset=DatasetSettings(path="x.jsonl"), gpus=[0, 1], device="cpu")
    assert [p.stem for p in device_lock_paths(cpu)] == ["cpu"]


def _cards(monkeypatch, free_mb: list[int]) -> None:
    """No GPU here: NVML's answer is replaced by cards with these free megabytes."""
    from engine.hardware.gpus import GpuInfo, GpuProbe

    cards = [
        GpuInfo(
            i, "NVIDIA RTX A4000", 16376, mb, 16376 - mb, 0, 40, 50.0, 140.0, "8.6", True, "570.86", "12.8"
        )
        for i, mb in enumerate(free_mb)
    ]
    monkeypatch.setattr("engine.hardware.gpus.probe_gpus", lambda: GpuProbe(available=True, gpus=cards))


def test_fsdp_is_chosen_when_the_model_fits_no_single_card_and_each_card_is_checked(monkeypatch):
    from engine.models.presets import get_preset
    from engine.planning.memory import estimate_memory
    from engine.planning.preflight import PreflightError, check_fit

    shape = get_preset("qwen2.5-7b").shape  # type: ignore[union-attr]
    whole, halves = (estimate_memory(shape, "16bit", 16, 1, 512, shards=n) for n in (1, 2))
    assert halves.weights_gib < 0.7 * whole.weights_gib and halves.lora_gib == whole.lora_gib

    def spec(**kw: object) -> FinetuneSpec:
        train = TrainSettings(max_seq_length=512)
        return FinetuneSpec(model="qwen2.5-7b", quantization="16bit", train=train, **kw)  # type: ignore[arg-type]

    _cards(monkeypatch, [16000, 16000])  # bf16 7B: ~18 GiB on one card, ~12 GiB each when sharded
    notes = check_fit(spec(gpus=[0, 1], dataset=DatasetSettings(path="x.jsonl")))
    assert notes == ["qwen2.5-7b fits no single card: its base weights are sharded over 2 cards (FSDP)"]
    with pytest.raises(PreflightError, match=r"does not fit on GPU 0 .*or parallel='fsdp'"):
        check_fit(spec(gpus=[0, 1], parallel="ddp", dataset=DatasetSettings(path="x.jsonl")))
    with pytest.raises(PreflightError, match="does not fit on GPU 1 "):  # one card: no sharding
        check_fit(spec(gpus=[1], dataset=DatasetSettings(path="x.jsonl")))
    _cards(monkeypatch, [16000, 8000])  # every card of the job must hold its share
    with pytest.raises(PreflightError, match=r"does not fit on GPU 1 .*sharded over 2 cards \(FSDP\)"):
        check_fit(spec(gpus="all", dataset=DatasetSettings(path="x.jsonl")))


def _smallest_free_memory(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from engine.training.ranks import RankContext

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    Path(out, f"rank-{rank}").write_text(str(RankContext(rank, 2, "cpu").smallest([10.5, 3.25][rank])))
    dist.destroy_process_group()


def test_every_rank_sizes_its_settings_for_the_tightest_card(tmp_path):
    """Each rank reads its own card's free memory; the defaults (micro-batch, accumulation, hence the
    step plan) must be the same on every rank, so they are sized for the smallest figure."""
    torch.multiprocessing.spawn(
        _smallest_free_memory, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2
    )
    assert [float((tmp_path / f"rank-{r}").read_text()) for r in (0, 1)] == [3.25, 3.25]


def test_the_gpu_report_says_which_cards_hold_each_preset(monkeypatch):
    """NVML cannot exist here: two 16 GB cards with 7.3 GiB free each are its stand-in."""
    from engine.cli.show import gpu_text
    from engine.planning.gpu_report import gpu_report

    _cards(monkeypatch, [7500, 7500])
    report = gpu_report()
    fits = {p.preset: p for p in report.presets}
    assert fits["qwen2.5-3b"].cards == [0, 1] and fits["qwen2.5-3b"].fsdp_memory_per_card_gib is None
    seven = fits["qwen2.5-7b"]  # ~8.4 GiB whole: no card holds it, each holds its half (FSDP)
    assert seven.fits and seven.cards == [] and seven.micro_batch_size is None
    assert seven.fsdp_memory_per_card_gib is not None and seven.fsdp_memory_per_card_gib < 7.3 * 0.95
    text = gpu_text(report)
    assert "Presets on GPUs 0, 1" in text
    assert f"all, FSDP ({seven.fsdp_memory_per_card_gib:.1f} GiB each)" in text

    _cards(monkeypatch, [16000, 4000])  # a busy second card: the big presets fit card 0 only
    fits = {p.preset: p for p in gpu_report().presets}
    assert fits["qwen2.5-7b"].cards == [0] and fits["qwen2.5-7b"].micro_batch_size
    assert fits["tiny"].cards == [0, 1]


def test_two_ranks_train_the_same_steps_as_one_rank_on_the_same_global_batch(tiny_model_dir, tmp_path):
    one = create_job(_spec(tiny_model_dir, None), root=tmp_path / "jobs")
    two = create_job(_spec(tiny_model_dir, [0, 1]), root=tmp_path / "jobs")
    assert _run(one) == 0
    assert _run(two) == 0, (two / "worker.log").read_text()[-3000:]

    r1, r2 = read_result(one), read_result(two)
    assert r1 is not None and r2 is not None
    assert r2.status == "succeeded" and r2.metrics["devices"] == 2
    losses1 = [h["loss"] for h in r1.loss_history]
    losses2 = [h["loss"] for h in r2.loss_history]
    assert len(losses2) == 3
    assert losses2 == pytest.approx(losses1, rel=1e-5, abs=1e-6)

    # progress shows global figures: the same tokens and gradient norms per step as one rank
    def steps(job: Path) -> list[tuple[int, float]]:
        events, _ = read_events(job / "events.jsonl")
        return [(e.tokens, e.grad_norm) for e in events if e.type == "progress"]

    (t1, g1), (t2, g2) = zip(*steps(one), strict=True), zip(*steps(two), strict=True)
    assert t2 == t1
    assert g2 == pytest.approx(g1, rel=1e-4)

    # one event log, counted once (rank 0 wrote the training events between the worker's own)
    events, _ = read_events(two / "events.jsonl")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events].count("started") == 1 and events[-1].type == "finished"
    assert [e.type for e in events].count("progress") == 3

    # one adapter, with the weights one rank trains (Adam divides each element's gradient by its own
    # running size, so where a gradient is near zero float noise can move a weight by a few percent
    # of one learning-rate step: atol 1e-4 against lr 3e-3)
    assert r2.artifacts["adapter"] == str((two / "adapter").resolve())
    w1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in (two / "ranks").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_fsdp_ranks_train_the_same_steps_as_one_rank_and_rank_0_writes_a_whole_adapter(
    tiny_model_dir, tmp_path
):
    """FSDP2 (fully_shard) over gloo on the CPU: the frozen weights sharded over two ranks."""
    from engine.models.adapters import is_adapter_folder

    # with a held-out split evaluated at the checkpoint of step 2 and at the end (every rank runs it)
    # 3 rows a step: rank 0 trains two micro-batches, rank 1 one and a weightless repeat (FSDP gathers
    # weights from every rank at every forward, so all run as many)
    settings = {"checkpoint_every": 2, "gradient_accumulation": 3}
    one = create_job(_spec(tiny_model_dir, None, held_out=0.2, **settings), root=tmp_path / "jobs")
    two = create_job(_spec(tiny_model_dir, [0, 1], "fsdp", 0.2, **settings), root=tmp_path / "jobs")
    assert _run(one) == 0
    assert _run(two) == 0, (two / "worker.log").read_text()[-3000:]
    r1, r2 = read_result(one), read_result(two)
    assert r1 is not None and r2 is not None and r2.status == "succeeded"
    assert r2.metrics["parallel"] == "fsdp" and r2.metrics["devices"] == 2
    losses1 = [h["loss"] for h in r1.loss_history]
    assert [h["loss"] for h in r2.loss_history] == pytest.approx(losses1, rel=1e-5, abs=1e-6)
    assert r2.metrics["eval_loss"] == pytest.approx(r1.metrics["eval_loss"], rel=1e-5)

    # a complete PEFT folder (config, weights, tokenizer), every LoRA tensor whole, written by rank 0 only
    adapter = two / "adapter"
    assert is_adapter_folder(adapter) and (adapter / "tokenizer_config.json").exists()
    w1 = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(adapter / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        assert w2[name].shape == w1[name].shape
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in two.iterdir() if p.name.startswith(("adapter", ".adapter"))) == ["adapter"]
    events, _ = read_events(two / "events.jsonl")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert any(e.type == "log" and e.message == "FSDP over 2 ranks" for e in events)


def test_a_series_on_several_ranks_trains_merges_and_scores_as_on_one(tiny_model_dir, tmp_path):
    """Every run trains through the same ranks (DDP, then FSDP); rank 0 writes the merged adapter.
    The DDP series goes through the Python API (Trainer(gpus=..., parallel=...))."""
    from engine.api import Trainer

    train = {"learning_rate": 3e-3, "micro_batch_size": 1, "gradient_accumulation": 2, "max_seq_length": 128}

    def series(gpus: list[int] | None, parallel: str = "auto") -> Path:
        trainer = Trainer(
            str(tiny_model_dir), quantization="none", lora_rank=8, device="cpu", gpus=gpus, parallel=parallel,
            workdir=tmp_path / "jobs", verbose=False,
        )  # fmt: skip
        return trainer.multi_run(CHAT, num_runs=2, steps_per_run=2, packing=False, **train).job_dir

    one = read_result(series(None))
    assert one is not None
    for parallel in ("ddp", "fsdp"):
        job = series([0, 1], parallel)
        many = read_result(job)
        assert many is not None and many.metrics["devices"] == 2 and many.metrics["parallel"] == parallel
        losses = [h["loss"] for h in many.loss_history]
        assert losses == pytest.approx([h["loss"] for h in one.loss_history], rel=1e-5, abs=1e-6)
        for row, expected in zip(many.metrics["loss_matrix"], one.metrics["loss_matrix"], strict=True):
            assert [v for v in row if v is not None] == pytest.approx([v for v in expected if v is not None])
        assert (job / "adapter" / "adapter_model.safetensors").exists() and (
            job / "adapter" / "series.json"
        ).exists()
        assert sorted(p.name for p in (job / "series").iterdir()) == ["finetuned", "merged", "state.json"]
        events, _ = read_events(job / "events.jsonl")
        assert [e.type for e in events].count("run_finished") == 2


def test_a_rank_error_fails_the_job_with_its_message(tiny_model_dir, tmp_path):
    # one row per step cannot be split over two ranks: every rank raises, the job names the error
    job = create_job(_spec(tiny_model_dir, [0, 1], gradient_accumulation=1), root=tmp_path / "jobs")
    assert _run(job) == 1
    result = read_result(job)
    assert result is not None and result.status == "failed" and result.error is not None
    assert result.error["type"] == "ValueError"
    assert "each needs at least one row" in result.error["message"]
    assert result.error["message"].startswith("rank ")
    events, _ = read_events(job / "events.jsonl")
    errors = [e for e in events if e.type == "error"]
    assert len(errors) == 1 and "raise gradient_accumulation to 2" in errors[0].message
    assert not (job / "adapter").exists()


def test_cancel_stops_every_rank_after_a_checkpoint_and_the_job_resumes(tiny_model_dir, tmp_path):
    job = create_job(_spec(tiny_model_dir, [0, 1]), root=tmp_path / "jobs")
    request_cancel(job)  # seen by rank 0 before the first step, broadcast to rank 1
    assert _run(job) == 2
    result = read_result(job)
    assert result is not None and result.status == "cancelled"
    assert "checkpoint was saved" in result.error["message"]
    assert [p.name for p in (job / CHECKPOINT_DIR).iterdir()] == ["step-000000"]
    assert not (job / "adapter").exists()

    prepare_resume(job)  # every rank loads rank 0's checkpoint and the run goes on to its end
    assert _run(job) == 0
    result = read_result(job)
    assert result is not None and result.status == "succeeded" and result.metrics["steps"] == 3
    assert (job / "adapter" / "adapter_model.safetensors").exists()
    events, _ = read_events(job / "events.jsonl")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


def test_train_speed_benchmark_runs_ddp_and_fsdp_over_nf4_in_its_cpu_smoke_mode(tmp_path):
    """benchmarks/train_speed.py --tiny --gpus 0,1 --fsdp: the engine's NF4 job (bitsandbytes' CPU
    backend, 4-bit codes stored as fp32, the CPU compute dtype) on one rank, two DDP ranks and two
    FSDP ranks over gloo; the same losses, and the records the GPU measurement reads."""
    import json

    records = tmp_path / "speed.jsonl"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--arch", "qwen2.5-0.5b", "--tiny",
        "--seq-len", "64", "--batch", "2", "--grad-accum", "2", "--steps", "2", "--warmup", "1",
        "--gpus", "0,1", "--fsdp", "--workdir", str(tmp_path / "work"), "--jsonl", str(records),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    one, ddp, fsdp = (json.loads(line) for line in records.read_text().splitlines())
    assert (one["devices"], ddp["parallel"], fsdp["parallel"]) == (1, "ddp", "fsdp")
    for rec in (ddp, fsdp):
        assert rec["devices"] == 2 and rec["tokens_per_s"] > 0 and len(rec["losses"]) == 3
        assert rec["losses"] == pytest.approx(one["losses"], abs=2e-4)
        assert f"{rec['variant']}: " in done.stdout and "x one card's tokens/s" in done.stdout
