"""Preference jobs as people run them: through the MCP tools (sft, then dpo from its adapter, then try and
export), the command line, the Python API; cancelled and resumed; the step's independence from the
micro-batch that the out-of-memory back-off relies on, and the evaluation after a back-off. Real workers
and the tiny model; nothing mocked but the out-of-memory error (simulated: no GPU here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from preference_tasks import write_task
from tool_calls import structured, until_done

from engine.contract.errors import JobCancelled
from engine.contract.events import Eval, EventWriter, Progress, read_events
from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings, read_result

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_task(tmp_path_factory.mktemp("colours"), per_colour=4)


@pytest.mark.slow
@pytest.mark.anyio
async def test_sft_then_dpo_from_its_adapter_then_try_then_export_through_the_tools(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path
) -> None:
    from mcp import Client

    from backprop_mcp.server import build_server

    common = {"model": str(tiny_model_dir), "device": "cpu", "lora_rank": 4, "learning_rate": 3e-3}
    async with Client(build_server(tmp_path / "home")) as client:
        check = structured(
            await client.call_tool(
                "check_dataset", {"path": str(task["pairs"]), "model": str(tiny_model_dir), "method": "dpo"}
            )
        )
        assert check["format"] == "preference", check
        sft = structured(
            await client.call_tool(
                "start_finetune", {"dataset_path": str(task["pairs"]), "steps": 4, **common}
            )
        )
        assert (await until_done(client, sft["job_id"]))["state"] == "succeeded"
        dpo = structured(
            await client.call_tool(
                "start_finetune",
                {
                    "dataset_path": str(task["pairs"]),
                    "method": "dpo",
                    "init_adapter": sft["job_id"],
                    "beta": 0.2,
                    "steps": 4,
                    "checkpoint_every": 2,
                    "eval_fraction": 0.25,
                    **common,
                },
            )  # fmt: skip
        )
        status = await until_done(client, dpo["job_id"])
        assert status["state"] == "succeeded", status
        tried = structured(
            await client.call_tool("try_model", {"job_id": dpo["job_id"], "prompt": "Name the color: red."})
        )
        assert isinstance(tried["text"], str)
        pytest.importorskip("llama_cpp")
        export = structured(
            await client.call_tool("export_gguf", {"job_id": dpo["job_id"], "quantizations": ["f16"]})
        )
        exported = await until_done(client, export["job_id"])
        assert exported["state"] == "succeeded", exported

    sft_log = read_events(Path(status["job_dir"]).parent / sft["job_id"] / "events.jsonl")[0]
    assert any("trains on the chosen answers" in (getattr(e, "message", None) or "") for e in sft_log)
    events = read_events(Path(status["job_dir"]) / "events.jsonl")[0]
    assert any(
        e.type == "log" and e.message.startswith("reference: a frozen copy of init_adapter") for e in events
    )
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4]
    assert set(progress[0].metrics or {}) >= {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    # the policy starts as its reference (init_adapter's frozen copy): no reward before the first update
    assert progress[0].metrics["rewards/chosen"] == 0 and progress[0].metrics["rewards/rejected"] == 0  # type: ignore[index]
    evals = [e for e in events if e.type == "eval"]
    assert [e.global_step for e in evals] == [2, 4] and all(
        "rewards/accuracies" in (e.metrics or {}) for e in evals
    )
    assert any(e.type == "checkpoint" for e in events)
    result = read_result(status["job_dir"])
    assert (
        result is not None
        and result.metrics["method"] == "dpo"
        and "eval_rewards/accuracies" in result.metrics
    )
    adapter = Path(result.artifacts["adapter"])
    assert (
        sorted(p.name for p in adapter.iterdir() if p.is_dir()) == []
    )  # one adapter: the frozen copy was not saved
    parity = json.loads((Path(exported["job_dir"]) / "result.json").read_text())["metrics"]["parity"]["f16"]
    assert parity["passed"] is True, parity


def _spec(tiny: Path, data: Path, **train: Any) -> FinetuneSpec:
    settings = {
        "steps": 4,
        "learning_rate": 3e-3,
        "micro_batch_size": 2,
        "gradient_accumulation": 2,
        "checkpoint_every": 2,
        **train,
    }
    return FinetuneSpec(
        model=str(tiny),
        method="dpo",
        lora=LoraSettings(rank=4),
        train=TrainSettings(**settings),
        dataset=DatasetSettings(path=str(data)),
    )


def test_a_cancelled_dpo_job_resumes_to_the_uninterrupted_run(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path
) -> None:
    from engine.jobs.dispatch import run_recipe
    from engine.models.adapters import load_factors

    spec = _spec(tiny_model_dir, task["pairs"])

    def run(job: Path, cancel_after: int | None = None) -> Any:
        job.mkdir(exist_ok=True)
        with EventWriter(job / "events.jsonl") as events:
            done = [0]
            events.listeners.append(lambda e: done.__setitem__(0, done[0] + isinstance(e, Progress)))
            return run_recipe(spec, job, events, lambda: cancel_after is not None and done[0] >= cancel_after)

    whole = run(tmp_path / "whole")
    with pytest.raises(JobCancelled, match="cancelled at step 2"):
        run(tmp_path / "stopped", cancel_after=2)
    resumed = run(tmp_path / "stopped")
    assert [h["loss"] for h in resumed.loss_history] == pytest.approx(
        [h["loss"] for h in whole.loss_history], abs=1e-6
    )
    log = read_events(tmp_path / "stopped" / "events.jsonl")[0]
    assert any(e.type == "log" and e.message == "resumed from checkpoint at step 2" for e in log)
    assert any(
        e.type == "log" and e.message.startswith("reference: the base model with the adapter switched off")
        for e in log
    )
    a, _ = load_factors(whole.artifacts["adapter"])
    b, _ = load_factors(resumed.artifacts["adapter"])
    for key, f in a.items():
        torch.testing.assert_close(f.B, b[key].B, atol=1e-6, rtol=0)


def _backprop(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=900,
    )


def test_the_command_line_trains_orpo_and_reports_its_figures_to_tensorboard(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = _backprop(
        tmp_path, "train", "--data", str(task["pairs"]), "--model", str(tiny_model_dir), "--method", "orpo", "--beta", "0.2",
        "--steps", "3", "--eval-fraction", "0.25", "--lora-rank", "4", "--report-to", "tensorboard",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = (tmp_path / "jobs").iterdir()
    assert read_result(job).metrics["method"] == "orpo"  # type: ignore[union-attr]
    acc = EventAccumulator(str(job / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/accuracies", "train/nll_loss", "eval/rewards/accuracies"} <= tags, (
        tags
    )


def test_the_python_api_trains_kto_on_a_paired_file_unpaired_by_rule(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKPROP_HOME", str(tmp_path / "home"))
    from engine import Trainer

    result = Trainer(str(tiny_model_dir), lora_rank=4, verbose=False).train(
        task["pairs"], method="kto", steps=2
    )
    assert (
        result.metrics["method"] == "kto" and result.metrics["examples"] == 40
    )  # 20 pairs, two answers each
    log = read_events(result.job_dir / "events.jsonl")[0]
    assert any("each pair is two judged answers" in (getattr(e, "message", None) or "") for e in log)
    assert (result.adapter_path / "adapter_config.json").exists()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("method", "loss_type"), [("dpo", None), ("kto", "apo_zero_unpaired"), ("orpo", None)]
)
def test_the_step_is_the_same_whatever_the_micro_batch(
    tiny_model_dir: Path, method: str, loss_type: str | None
) -> None:
    """The out-of-memory back-off halves the micro-batch mid-run: the step's loss, figures and gradients must
    not change with it (fp32). kto's own loss is left out: its reference point z0 is each micro-batch's, as in
    trl's KTOTrainer (tests/test_preference_maths.py proves that equality under gradient accumulation)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.contract.preference import PreferenceSettings
    from engine.data.preference_tokens import PreferenceTokens
    from engine.training.preference_objectives import Compute, objective_for
    from engine.training.preference_step import step_totals
    from engine.training.reference import Reference, reference_logps

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    seqs = [
        torch.randint(10, 500, (int(n),), generator=g).tolist()
        for n in torch.randint(6, 14, (8,), generator=g)
    ]
    data = PreferenceTokens(
        seqs, [[-100] * 4 + s[4:] for s in seqs], [4] * 8,
        [[i] for i in range(8)] if method == "kto" else [[2 * i, 2 * i + 1] for i in range(4)],
        desirable=[i % 2 == 0 for i in range(8)] if method == "kto" else [],
    )  # fmt: skip
    objective = objective_for(method, data, PreferenceSettings(loss_type=loss_type), Compute(0, "cpu"))
    if objective.needs_reference:
        seqs_needed = objective.reference_sequences()
        objective.set_reference(
            reference_logps(
                Reference(model, None),
                objective.view,
                seqs_needed,
                batch=8,
                pad_id=0,
                device="cpu",
                autocast_dtype=None,
            )
        )
    units = list(range(len(data.units)))
    seen = []
    for micro in (len(units), 2, 1):
        model.zero_grad(set_to_none=True)
        loss, sums, _ = step_totals(objective, model, units, micro, train=True)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        seen.append((loss, {k: v.item() for k, v in sums.items()}, grads))
    for loss, sums, grads in seen[1:]:
        torch.testing.assert_close(loss, seen[0][0], atol=1e-6, rtol=1e-5)
        assert sums == pytest.approx(seen[0][1], abs=1e-5)
        torch.testing.assert_close(grads, seen[0][2], atol=1e-6, rtol=1e-4)


def test_after_an_out_of_memory_back_off_the_evaluation_takes_the_smaller_micro_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """There is no GPU here, so the out-of-memory error is simulated: a hook on the decoder raises torch's
    CUDA OutOfMemoryError the first time a forward pass with gradients gets more than one pair (two rows).
    The loop halves the micro-batch from two pairs to one; the held-out evaluation then takes one pair at a
    time too."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.contract.preference import PreferenceSettings
    from engine.data.preference_tokens import PreferenceTokens
    from engine.training.loop import train_adapter
    from engine.training.preference_objectives import Compute, objective_for
    from engine.training.preference_step import PreferenceTrainStep, preference_evaluator
    from engine.training.reference import Reference, reference_logps
    from engine.training.token_logps import causal_lm

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)

    def pairs(n: int) -> PreferenceTokens:
        seqs = [torch.randint(10, 500, (8,), generator=g).tolist() for _ in range(2 * n)]
        units = [[2 * i, 2 * i + 1] for i in range(n)]
        return PreferenceTokens(seqs, [[-100] * 4 + s[4:] for s in seqs], [4] * (2 * n), units)

    compute = Compute(0, "cpu")
    train, held = (objective_for("dpo", pairs(n), PreferenceSettings(), compute) for n in (4, 4))
    for objective in (train, held):
        objective.set_reference(
            reference_logps(
                Reference(model, None),
                objective.view,
                objective.reference_sequences(),
                batch=8,
                pad_id=0,
                device="cpu",
                autocast_dtype=None,
            )  # fmt: skip
        )
    seen: list[tuple[bool, int]] = []  # (with gradients, rows) of each forward pass

    def short_of_memory(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        rows, training = kwargs["input_ids"].shape[0], torch.is_grad_enabled()
        seen.append((training, rows))
        if training and rows > 2 and sum(t for t, _ in seen) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    class Plan:
        steps, learning_rate, warmup_steps, lr_scheduler = 2, 1e-3, 0, "constant"
        micro_batch_size, gradient_accumulation, max_seq_length, packing = 2, 1, 16, False
        rows_per_step = 2
        weight_decay, max_grad_norm, seed, checkpoint_every = 0.0, 1.0, 0, 1
        gradient_checkpointing = True  # so the back-off halves the micro-batch at once

    class Tokenizer:
        pad_token_id = 0

    step = PreferenceTrainStep(train, micro=Plan.micro_batch_size)
    hook = causal_lm(model).model.register_forward_pre_hook(short_of_memory, with_kwargs=True)
    try:
        with EventWriter(tmp_path / "events.jsonl") as events:
            evaluator = preference_evaluator(held, model, lambda: step.micro, events)
            outcome = train_adapter(
                model,
                Tokenizer,
                train.data,
                Plan,
                device="cpu",
                events=events,
                evaluator=evaluator,
                step_fn=step,
            )
    finally:
        hook.remove()
    assert outcome.micro_batch_size == 1 and seen[0] == (True, 4)  # two pairs ran out of memory: one pair
    evaluations = [e for e in read_events(tmp_path / "events.jsonl")[0] if isinstance(e, Eval)]
    assert len(evaluations) == 1  # after step 1 (the last step is evaluated by the recipe)
    assert {rows for training, rows in seen if not training} == {2}  # one pair per held-out forward pass


def test_the_preference_speed_benchmark_runs_in_its_cpu_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/preference_speed.py --tiny: the engine's DPO job and trl's DPOTrainer (and trl with its
    precomputed reference, and trl with each batch split in two, the GPU run's bf16 noise floor) on the same
    tokens, order and initial adapter: the same per-step losses, and the records and headline the GPU
    measurement reads, the headline counting the runs' reference passes (Unsloth needs a GPU: not run
    here, and the headline says so)."""
    pytest.importorskip("trl")
    records = tmp_path / "speed.jsonl"
    command = [
        sys.executable, str(REPO / "benchmarks" / "preference_speed.py"), "--tiny", "--prompt-len", "24",
        "--answer-len", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--trl-precompute",
        "--workdir", str(tmp_path / "work"), "--jsonl", str(records),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    engine, trl, split, precomputed = (json.loads(line) for line in records.read_text().splitlines())
    assert (engine["variant"], trl["variant"]) == ("engine", "trl") and "precompute" in precomputed["variant"]
    assert "noise floor" in split["variant"]  # trl again, each batch as two micro-batches
    for rec in (engine, trl, split, precomputed):
        assert rec["pairs_per_s"] > 0 and len(rec["losses"]) == 3 and len(rec["step_s"]) == 3
        assert rec["losses"] == pytest.approx(
            trl["losses"], abs=1e-4
        )  # fp32: the same maths, the same losses
    assert "|loss - trl's|, steps 2-3: engine: mean" in done.stdout
    assert "per-step losses (and seconds)" in done.stdout
    for rec in (engine, precomputed):  # a reference pass before training: its time shared over the pairs
        pairs = 2 * len(rec["losses"])
        assert rec["pairs_per_s_with_reference"] == pytest.approx(
            1 / (1 / rec["pairs_per_s"] + rec["reference_s"] / pairs), rel=1e-2
        )
    assert "pairs_per_s_with_reference" not in trl  # its reference forward is inside each step
    # the engine's pass says its first forward pass apart (on a GPU it compiles the head's kernel): the
    # pass at its steady rate is the rest of it, scaled to every sequence
    passes = engine["reference_pass"]
    assert passes["sequences"] >= 2 * 2 * len(engine["losses"]) > passes["first_pass_sequences"] > 0
    assert 0 < passes["first_pass_s"] < passes["reference_s"]
    rest = passes["sequences"] - passes["first_pass_sequences"]
    steady = (passes["reference_s"] - passes["first_pass_s"]) * passes["sequences"] / rest
    assert engine["reference_steady_s"] == pytest.approx(steady, abs=0.01)
    assert "the pass at its steady rate" in done.stdout
    headline = next(line for line in done.stdout.splitlines() if line.startswith("DPO 0.5B QLoRA: "))
    assert headline.startswith(
        f"DPO 0.5B QLoRA: {engine['pairs_per_s_with_reference'] / trl['pairs_per_s']:.2f}×"
    )
    assert "trl's DPOTrainer" in headline and "its peak memory; Unsloth not run (CPU, " in headline
    assert "steps alone (the engine's reference pass left out)" in done.stdout and "control:" in done.stdout


def test_an_sft_job_continues_from_init_adapter_with_its_rank(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path
) -> None:
    """init_adapter is general (any method): an sft job trains that adapter, with its own rank and targets."""
    from engine.jobs.dispatch import run_recipe

    def run(name: str, **settings: Any) -> Any:
        job = tmp_path / name
        job.mkdir()
        spec = FinetuneSpec(
            model=str(tiny_model_dir), dataset=DatasetSettings(path=str(task["sft"])), **settings
        )
        with EventWriter(job / "events.jsonl") as events:
            return run_recipe(spec, job, events, lambda: False)

    first = run(
        "first",
        lora=LoraSettings(rank=4),
        train=TrainSettings(steps=2, micro_batch_size=4, gradient_accumulation=1),
    )
    second = run(
        "second", lora=LoraSettings(rank=8), init_adapter=first.artifacts["adapter"],
        train=TrainSettings(steps=1, micro_batch_size=4, gradient_accumulation=1),
    )  # fmt: skip
    log = read_events(tmp_path / "second" / "events.jsonl")[0]
    assert any(e.type == "log" and e.message.startswith("LoRA from init_adapter") for e in log)
    config = json.loads((Path(second.artifacts["adapter"]) / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_the_command_line_starts_dpo_from_a_finished_jobs_id(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path
) -> None:
    common = ("--model", str(tiny_model_dir), "--steps", "1", "--lora-rank", "4", "--eval-fraction", "0")
    sft = _backprop(tmp_path, "train", "--data", str(task["sft"]), *common)
    assert sft.returncode == 0, sft.stderr[-3000:]
    (first,) = (tmp_path / "jobs").iterdir()

    dpo_from = ("train", "--data", str(task["pairs"]), "--method", "dpo", "--init-adapter")
    dpo = _backprop(tmp_path, *dpo_from, first.name, *common)
    assert dpo.returncode == 0, dpo.stderr[-3000:]
    (second,) = [job for job in (tmp_path / "jobs").iterdir() if job != first]
    assert json.loads((second / "spec.json").read_text())["init_adapter"] == str(
        first
    )  # the worker reads a folder
    log = read_events(second / "events.jsonl")[0]
    assert any(
        e.type == "log" and e.message.startswith("reference: a frozen copy of init_adapter") for e in log
    )
    unknown = _backprop(tmp_path, *dpo_from, "ft-nope", *common)
    assert unknown.returncode != 0
    assert "--init-adapter: 'ft-nope' does not exist. Give a finished job's id or folder" in unknown.stderr
    assert unknown.stderr.count("--init-adapter:") == 1


def test_the_python_api_starts_dpo_from_a_finished_jobs_id_under_its_workdir(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKPROP_HOME", str(tmp_path / "home"))
    from engine import Trainer

    trainer = Trainer(
        str(tiny_model_dir), workdir=tmp_path / "jobs", lora_rank=4, eval_fraction=0, verbose=False
    )
    sft = trainer.train(task["sft"], steps=1)
    dpo = trainer.train(task["pairs"], method="dpo", init_adapter=sft.job_dir.name, steps=1)
    assert json.loads((dpo.job_dir / "spec.json").read_text())["init_adapter"] == str(sft.job_dir)
    assert dpo.metrics["reference"].startswith("a frozen copy of init_adapter")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("method", ["dpo", "kto", "orpo"])
def test_gpu_each_method_trains_on_the_4bit_fast_path(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """Each method as a user starts it on a GPU (the Python API, defaults: NF4 base, the fused LoRA layers,
    the compiled loss kernel): the job ends, every step's loss and figures are finite, and the run says
    which path it took."""
    import math

    monkeypatch.setenv("BACKPROP_HOME", str(tmp_path / "home"))
    from engine import Trainer

    result = Trainer(str(tiny_model_dir), lora_rank=4, verbose=False).train(
        task["pairs"], method=method, steps=4, eval_fraction=0.25
    )
    m = result.metrics
    assert (m["method"], m["quantization"]) == (method, "4bit") and str(m["device"]).startswith("cuda"), m
    assert (m.get("peak_gpu_memory_gib") or 0) > 0, m
    events = read_events(result.job_dir / "events.jsonl")[0]
    logs = " | ".join(e.message for e in events if e.type == "log")
    assert "fused LoRA on" in logs, logs[-2000:]
    progress = [e for e in events if isinstance(e, Progress)]
    assert len(progress) == 4
    for p in progress:
        figures = p.metrics or {}
        assert p.loss is not None and math.isfinite(p.loss) and "rewards/accuracies" in figures, p
        assert all(math.isfinite(v) for v in figures.values()), figures
    evals = [e for e in events if isinstance(e, Eval)]
    assert evals and "rewards/accuracies" in (evals[-1].metrics or {}), evals
