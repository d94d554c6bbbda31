"""The training recipe on the tiny model, on CPU: batching, loss, a real job end to end, resume, 4-bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.contract.events import read_events
from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings, read_result
from engine.jobs.runner import create_job
from engine.training.batching import IGNORE, collate, pack_rows, plan_steps
from engine.training.loss import causal_lm_loss_sum, chunked_lm_loss_sum

ROOT = Path(__file__).resolve().parents[1]
CHAT = ROOT / "examples" / "data" / "chat.jsonl"


def _run_worker(job_dir: Path, timeout: float = 600) -> int:
    return subprocess.run(
        [sys.executable, "-m", "engine", "run", str(job_dir)],
        cwd=ROOT,
        timeout=timeout,
        stderr=subprocess.DEVNULL,
    ).returncode


def _spec(tiny_model_dir: Path, data: Path = CHAT, **train: object) -> FinetuneSpec:
    settings = {
        "learning_rate": 3e-3,
        "micro_batch_size": 4,
        "gradient_accumulation": 1,
        "max_seq_length": 128,
        **train,
    }
    return FinetuneSpec(
        model=str(tiny_model_dir),
        lora=LoraSettings(rank=8),
        train=TrainSettings(**settings),
        dataset=DatasetSettings(path=str(data)),
    )


def test_collate_restarts_positions_and_never_predicts_across_examples():
    ids = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    labels = [[IGNORE, 2, 3], [4, 5], [IGNORE, IGNORE, 8, 9]]
    b = collate([[0, 1], [2]], ids, labels, pad_id=0, pad_to_multiple=8)
    assert b.input_ids.shape == (2, 8)
    assert b.position_ids[0, :5].tolist() == [0, 1, 2, 0, 1]
    # example 0 predicts 2, 3 then nothing; example 1 predicts 5 then nothing (not example 2's start)
    assert b.targets[0, :5].tolist() == [2, 3, IGNORE, 5, IGNORE]
    assert b.targets[1, :4].tolist() == [IGNORE, 8, 9, IGNORE]
    assert (b.targets[:, 5:][b.input_ids[:, 5:] == 0] == IGNORE).all()
    assert b.real_tokens == 9 and b.target_tokens == 5


def test_packing_fills_rows_and_plan_is_deterministic():
    lengths = [100, 30, 70, 50, 20, 90]
    rows = pack_rows(lengths, 128, packing=True)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert len(rows) < len(lengths)
    a = plan_steps(lengths, max_seq_length=128, packing=True, rows_per_step=2, total_steps=7, seed=3)
    b = plan_steps(lengths, max_seq_length=128, packing=True, rows_per_step=2, total_steps=7, seed=3)
    assert a.steps == b.steps and a.total_steps == 7


def test_chunked_loss_equals_full_cross_entropy_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    weight = torch.randn(40_000, 16, requires_grad=True)  # large vocab -> several chunks
    targets = torch.randint(0, 40_000, (3, 50))
    targets[0, :10] = IGNORE
    ours = chunked_lm_loss_sum(hidden, weight, targets)
    ours.backward()
    g_ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = torch.nn.functional.cross_entropy(
        (hidden @ weight.T).reshape(-1, 40_000), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(g_ours[0], hidden.grad, atol=1e-5) and torch.allclose(
        g_ours[1], weight.grad, atol=1e-5
    )


def test_frozen_head_loss_computes_its_gradient_in_the_forward_pass_exactly():
    """LinearCrossEntropy (a frozen output head, as in LoRA): the same loss and hidden-state gradient as
    cross-entropy over full logits, with IGNORE rows, several chunks and an upstream scale."""
    from engine.training.loss import LinearCrossEntropy, token_loss_sum

    torch.manual_seed(0)
    hidden = torch.randn(150, 16, requires_grad=True)
    weight = torch.randn(40_000, 16)  # frozen; large vocab -> several chunks
    targets = torch.randint(0, 40_000, (150,))
    targets[:10] = IGNORE
    targets[-3:] = IGNORE
    calls = []
    orig = LinearCrossEntropy.forward
    LinearCrossEntropy.forward = staticmethod(lambda *a: calls.append(1) or orig(*a))  # type: ignore[method-assign]
    try:
        ours = token_loss_sum(hidden, weight, targets)
    finally:
        LinearCrossEntropy.forward = staticmethod(orig)  # type: ignore[method-assign]
    assert calls, "a frozen head takes the fused path"
    (ours * 3.0).backward()
    g_ours = hidden.grad.clone()
    hidden.grad = None
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE, reduction="sum")
    (ref * 3.0).backward()
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert torch.allclose(g_ours, hidden.grad, rtol=1e-5, atol=1e-4)  # fp32, another summation order
    assert g_ours[:10].abs().max() == 0  # ignored positions get no gradient


def _chunk(n: int = 64, vocab: int = 3000, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(n, vocab, generator=g) * 3).to(device, dtype)
    index = torch.randint(0, vocab, (n, 1), generator=g).to(device)
    keep = torch.ones(n, 1, dtype=torch.bool, device=device)
    keep[::5] = False  # IGNORE rows
    return logits, index, keep


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_compilable_chunk_loss_equals_cross_entropy_and_the_eager_ops_exactly(temperature: float):
    """softmax_cross_entropy_grad (what runs compiled on a GPU), run eagerly in fp32: the same per-row losses
    and logit gradient as F.cross_entropy's on the logits over the temperature, and as the eager in-place
    ops that the CPU uses."""
    from engine.training.loss import cross_entropy_rows, softmax_cross_entropy_grad

    logits, index, keep = _chunk()
    losses, grad = softmax_cross_entropy_grad(logits, index, keep.float(), temperature)
    x = logits.clone().requires_grad_(True)
    targets = torch.where(keep[:, 0], index[:, 0], torch.full_like(index[:, 0], IGNORE))
    ref = torch.nn.functional.cross_entropy(x / temperature, targets, ignore_index=IGNORE, reduction="none")
    ref.sum().backward()
    assert losses.shape == (logits.shape[0],)
    torch.testing.assert_close(losses, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, atol=1e-6, rtol=1e-5)
    eager_losses, eager_grad = cross_entropy_rows(logits, index, keep, temperature)  # the CPU's in-place ops
    torch.testing.assert_close(eager_losses, losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eager_grad, grad, atol=1e-6, rtol=1e-5)
    assert grad[::5].abs().max() == 0 and losses[::5].abs().max() == 0


_CONTEXT_CHECK = """
import threading, torch
from engine.training.loading import job_device
def context():
    return torch.cuda.is_available() and torch._C._cuda_hasPrimaryContext(0)
had = context()
device = job_device("{choice}")
makers = [t for t in threading.enumerate() if t.name == "cuda-context"]
for t in makers:
    t.join()
print(device, had, len(makers), context())
"""


def _context_check(choice: str) -> list[str]:
    """(device, a context before, context threads started, a context after) from a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", _CONTEXT_CHECK.format(choice=choice)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_a_cpu_job_starts_no_cuda_context_thread():
    assert _context_check("cpu") == ["cpu", "False", "0", "False"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_a_gpu_job_makes_its_cuda_context_on_a_thread_from_its_start():
    """job_device returns at once and a thread makes the card's context, while the job goes on (a fresh
    process: this one has a context already)."""
    assert _context_check("auto") == ["cuda:0", "False", "1", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_compiled_chunk_loss_follows_the_eager_ops():
    """The compiled kernel on bf16 logits against the eager ops: within bf16 rounding."""
    from engine.training import loss as loss_module

    logits, index, keep = _chunk(512, 151_936, torch.bfloat16, "cuda")
    for temperature in (1.0, 0.7):  # the next-token loss's, GRPO's sampling temperature
        losses, grad = loss_module.cross_entropy_rows(logits, index, keep, temperature)
        assert "failed" not in loss_module._COMPILED, loss_module._COMPILED.get("failed")
        ref_losses, ref_grad = loss_module.softmax_cross_entropy_grad(
            logits, index, keep.float(), temperature
        )
        torch.testing.assert_close(losses, ref_losses, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(grad.float(), ref_grad.float(), atol=2e-3, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
@pytest.mark.parametrize("head", ["next-token loss", "token log-probabilities"])
def test_gpu_chunked_head_holds_one_chunk_of_16_bit_logits_and_their_gradient(head: str):
    """The frozen head's working set over its kept results: one chunk's bf16 logits and their bf16 gradient
    (the previous chunk's dropped first, nothing in fp32), at Qwen2.5's vocabulary."""
    from engine.planning.memory import loss_chunk_tokens
    from engine.training.loss import token_loss_sum
    from engine.training.token_logps import token_logps

    run = token_loss_sum if head == "next-token loss" else token_logps
    vocab, width, n = 151_936, 896, 4096
    weight = torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(n, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    run(hidden, weight, targets).sum().backward()  # compiles the kernel for these chunks first
    hidden.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run(hidden, weight, targets)
    peak = torch.cuda.max_memory_allocated() - before
    chunk = loss_chunk_tokens(vocab) * vocab * 2 * 2  # bf16 logits and bf16 gradient
    kept = n * width * 2 + n * 4  # the hidden states' gradient, the log-probabilities
    print(
        f"{head}: working set {peak / 2**20:.0f} MiB; one chunk's logits and gradient {chunk / 2**20:.0f} MiB"
    )
    assert peak <= 1.1 * chunk + kept + 16 * 2**20
    del out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_loss_kernel_compiled_ahead_serves_a_step_without_compiling_again(monkeypatch):
    """compile_ahead's thread compiles the chunk kernel for a full chunk and a shape-generic last one: a
    step's chunks of either kind then compile nothing more (torch._dynamo's count of frames compiled)."""
    from torch._dynamo.utils import counters

    from engine.planning.memory import loss_chunk_tokens
    from engine.training import loss as loss_module

    vocab = 32_000
    monkeypatch.setattr(loss_module, "_COMPILED", {})  # as in a fresh job: nothing compiled yet
    thread = loss_module.compile_ahead("cuda", vocab)
    assert thread is not None
    thread.join()
    assert "failed" not in loss_module._COMPILED, loss_module._COMPILED.get("failed")
    frames = counters["stats"]["unique_graphs"]
    for rows in (loss_chunk_tokens(vocab), 37):
        logits, index, keep = _chunk(rows, vocab, torch.bfloat16, "cuda")
        loss_module.cross_entropy_rows(logits, index, keep)
    assert counters["stats"]["unique_graphs"] == frames
    assert loss_module.compile_ahead("cuda", vocab) is None  # a series' later runs: compiled already
    from torch._inductor import config

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # compiled in process: no pool of workers
        assert config.compile_threads == 1


def test_loss_kernel_compiles_in_process_and_compiled_layers_get_the_worker_pool(monkeypatch):
    """Inductor's pool of compile workers (a process a core, each importing torch) is for compiled layers,
    not for the loss kernel; once layers asked for it the loss kernel keeps it; a user's
    TORCHINDUCTOR_COMPILE_THREADS is left alone. (The setting only: no compiler runs here.)"""
    from torch._inductor import config

    from engine.training import loss as loss_module

    monkeypatch.setattr(loss_module, "_COMPILED", {})
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(config, "compile_threads", config.compile_threads)  # put back afterwards
    pool = config.decide_compile_threads()
    loss_module.compile_workers(pool=False)
    assert config.compile_threads == 1
    loss_module.compile_workers(pool=True)
    assert config.compile_threads == pool
    loss_module.compile_workers(pool=False)
    assert config.compile_threads == pool
    monkeypatch.setattr(loss_module, "_COMPILED", {})
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    config.compile_threads = 3
    loss_module.compile_workers(pool=False)
    assert config.compile_threads == 3


def test_packed_micro_batch_loss_equals_examples_run_one_by_one(tiny_model_dir):
    """Packing must not let examples see each other: same loss as running each alone with HF's own loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (17, 9, 30, 5)]
    labels = [list(x) for x in ids]
    batch = collate([[0, 1], [2, 3]], ids, labels, pad_id=0)
    with torch.no_grad():
        packed = (
            causal_lm_loss_sum(model, batch.input_ids, batch.position_ids, batch.targets)
            / batch.target_tokens
        )
        per = [model(input_ids=torch.tensor([x]), labels=torch.tensor([x])).loss * (len(x) - 1) for x in ids]
    reference = sum(per) / sum(len(x) - 1 for x in ids)
    assert abs(float(packed) - float(reference)) < 1e-4


def test_engine_loop_matches_a_plain_peft_loop_step_by_step(tiny_model_dir, tmp_path):
    """Same data, seed and init: the engine's losses equal a textbook transformers+peft loop's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.contract.events import EventWriter
    from engine.data.tokenizing import Tokenized
    from engine.planning.defaults import ResolvedTraining  # noqa: F401 - the real type train_adapter gets
    from engine.training.loop import train_adapter

    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(10, 200, (24,), generator=g).tolist() for _ in range(8)]
    data = Tokenized(ids, [list(x) for x in ids], dropped=0)

    class R:  # the resolved settings train_adapter reads
        steps, learning_rate, warmup_steps, lr_scheduler = 4, 1e-2, 0, "constant"
        micro_batch_size, gradient_accumulation, max_seq_length, packing = 2, 1, 24, False
        rows_per_step = 2  # rows of the step plan (ResolvedTraining's property)
        weight_decay, max_grad_norm, seed, checkpoint_every = 0.0, 1e9, 0, None

    def fresh():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        return get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        )

    model = fresh()
    with EventWriter(tmp_path / "events.jsonl") as ev:
        out = train_adapter(model, _Tok(), data, R, device="cpu", events=ev)
    ours = [h["loss"] for h in out.loss_history]
    events, _ = read_events(tmp_path / "events.jsonl")
    account = next(e.details for e in events if e.type == "log" and "loop_s" in e.details)  # the loop's time
    steps_s = sum(e.step_s for e in events if e.type == "progress")
    assert account["steps_s"] == pytest.approx(steps_s, abs=1e-3)
    parts = account["steps_s"] + account["checkpoints_s"] + account["between_steps_s"]
    assert account["loop_s"] == pytest.approx(parts, abs=2e-3) and account["setup_s"] >= 0

    model = fresh()
    from engine.training.batching import plan_steps

    plan = plan_steps(data.lengths, max_seq_length=24, packing=False, rows_per_step=2, total_steps=4, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ref = []
    for rows in plan.steps:
        x = torch.tensor([ids[r[0]] for r in rows])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref.append(float(loss))
    assert ours == pytest.approx(ref, abs=2e-4)


class _Tok:
    pad_token_id = 0


def test_job_trains_learns_and_writes_a_well_formed_log(tiny_model_dir, tmp_path):
    job_dir = create_job(_spec(tiny_model_dir, steps=30), root=tmp_path)
    assert _run_worker(job_dir) == 0
    events, _ = read_events(job_dir / "events.jsonl")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    types = [e.type for e in events]
    assert types[0] == "started" and types[-1] == "finished"
    progress = [e.model_dump(exclude_none=True) for e in events if e.type == "progress"]
    assert [p["step"] for p in progress] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "total"):
        assert key in progress[-1]
    result = read_result(job_dir)
    assert result.status == "succeeded"
    first = sum(p["loss"] for p in progress[:3]) / 3
    last = sum(p["loss"] for p in progress[-3:]) / 3
    assert last < 0.9 * first, (first, last)  # the example data has a learnable pattern (7.5 -> ~6.3 here)

    # the adapter is a plain PEFT adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, result.artifacts["adapter"])
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        with tuned.disable_adapter():
            before = tuned(input_ids=x).logits
        after = tuned(input_ids=x).logits
    assert not torch.allclose(before, after)


def test_four_bit_path_trains_a_step_on_cpu(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    spec = _spec(tiny_model_dir, steps=2)
    spec.quantization = "4bit"
    job_dir = create_job(spec, root=tmp_path)
    assert _run_worker(job_dir) == 0
    result = read_result(job_dir)
    assert result.status == "succeeded" and result.metrics["quantization"] == "nf4"


def test_bad_dataset_fails_with_an_actionable_error_event(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{not json\n'
    )
    job_dir = create_job(_spec(tiny_model_dir, data=bad, steps=2), root=tmp_path)
    assert _run_worker(job_dir) == 1
    events, _ = read_events(job_dir / "events.jsonl")
    error = next(e for e in events if e.type == "error")
    assert error.exception == "PreflightError"  # the worker runs the same preflight first
    assert "bad.jsonl:2" in error.message
    assert events[-1].type == "finished" and events[-1].status == "failed"
    assert read_result(job_dir).status == "failed"


def test_python_api_in_three_lines(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKPROP_HOME", str(tmp_path / "home"))
    from engine import Trainer

    result = Trainer(str(tiny_model_dir), lora_rank=4, verbose=False).train(CHAT, steps=3, max_seq_length=96)
    saved = result.save(tmp_path / "adapter")
    assert (saved / "adapter_config.json").exists()
    assert len(result.losses) == 3
    assert json.loads((saved / "adapter_config.json").read_text())["r"] == 4


def test_cli_help_does_not_import_the_ml_stack():
    code = "import sys, engine.cli.main; engine.cli.main.build_parser(); print(sorted(m for m in ('torch','transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run(
        [sys.executable, "-m", "engine.cli.main", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert "multi-run" in help_text.stdout and "export" in help_text.stdout


def _train_with_one_simulated_oom(tiny_model_dir, tmp_path, recompute: bool | None):
    """CUDA OOM cannot happen on a CPU, so the first step raises it (simulated); the rest is real.
    The step is plugged in as an objective would be, with figures of its own (Progress.metrics).
    Returns each step call's (micro-batch, layers recomputing), the outcome and the warning events."""
    from dataclasses import replace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import engine.training.loop as train_module
    from engine.contract.events import EventWriter
    from engine.training.fast_step import run_step
    from engine.training.loop import Tokenized
    from engine.training.step import StepInputs, StepResult

    seen: list[tuple[int, bool]] = []

    def step_that_runs_out_of_memory_once(inputs: StepInputs) -> StepResult:  # a plugged-in step
        layers = inputs.model.get_base_model().model.layers
        seen.append((inputs.micro, all(m.gradient_checkpointing for m in layers)))
        if len(seen) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return replace(run_step(inputs), metrics={"step_calls": float(len(seen))})

    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(10, 200, (16,), generator=g).tolist() for _ in range(8)]

    class R:
        steps, learning_rate, warmup_steps, lr_scheduler = 2, 1e-3, 0, "constant"
        micro_batch_size, gradient_accumulation, max_seq_length, packing = 4, 1, 16, False
        rows_per_step = 4  # rows of the step plan (ResolvedTraining's property)
        weight_decay, max_grad_norm, seed, checkpoint_every = 0.0, 1.0, 0, None

    if recompute is not None:
        R.gradient_checkpointing = recompute  # type: ignore[attr-defined]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with EventWriter(tmp_path / "events.jsonl") as ev:
        out = train_module.train_adapter(
            model, _Tok(), Tokenized(ids, [list(x) for x in ids], 0), R, device="cpu", events=ev,
            step_fn=step_that_runs_out_of_memory_once,
        )  # fmt: skip
    events = read_events(tmp_path / "events.jsonl")[0]
    assert [e.metrics for e in events if e.type == "progress"] == [{"step_calls": 2.0}, {"step_calls": 3.0}]
    return seen, out, [e for e in events if e.type == "warning"]


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(tiny_model_dir, tmp_path):
    seen, out, warnings = _train_with_one_simulated_oom(tiny_model_dir, tmp_path, None)
    assert [micro for micro, _ in seen] == [4, 2, 2]
    assert out.steps_done == 2 and out.micro_batch_size == 2 and out.gradient_accumulation == 2
    assert "micro-batch halved to 2" in warnings[0].message


def test_out_of_memory_without_recomputation_switches_it_on_before_halving(tiny_model_dir, tmp_path):
    """The defaults skip recomputation where memory seems to allow it; an OOM then switches gradient
    checkpointing on at the same micro-batch."""
    seen, out, warnings = _train_with_one_simulated_oom(tiny_model_dir, tmp_path, False)
    assert seen == [(4, False), (4, True), (4, True)]  # same micro-batch, recomputing from the retry on
    assert out.steps_done == 2 and out.micro_batch_size == 4
    assert len(warnings) == 1 and "gradient checkpointing switched on" in warnings[0].message
