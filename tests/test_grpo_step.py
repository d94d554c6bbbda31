"""The GRPO step on the tiny model, on the CPU: it samples, scores, learns, logs what the model writes,
keeps a rollout for a retry after an out-of-memory error, and does not grow in memory step over step.

Torch runs on one thread here: on a shared machine with few cores, its default thread pool spends the
time waiting (tens of times slower for this small model).
"""

from __future__ import annotations

import contextlib
import gc
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.contract.events import EventWriter, read_events
from engine.contract.grpo import GrpoSettings
from engine.contract.grpo_figures import step_figures
from engine.data.formats import Example
from engine.rewards.scoring import build_rewards
from engine.training.grpo_generate import Sampling, end_of_sequence_ids
from engine.training.grpo_rollout import PromptSet
from engine.training.grpo_samples import CompletionsLog
from engine.training.grpo_step import GrpoLoss, GrpoRun, grpo_step
from engine.training.step import StepInputs

G = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(
    tiny_model_dir: Path, tmp_path: Path, beta: float = 0.0, random_lora: bool = False
) -> tuple[Any, Any, GrpoRun]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=not random_lora)
    model = get_peft_model(base, config)  # random_lora: the policy starts away from the reference
    examples = [
        Example(kind="prompt", prompt=f"What is {i} plus {i}?", columns={"answer": str(2 * i)})
        for i in range(6)
    ]
    examples.append(
        Example(kind="prompt", messages=[{"role": "user", "content": "Name a colour."}], columns={})
    )
    # the user's own reward (characters written) tells a random model's completions apart
    chars = tmp_path / "chars.py"
    chars.write_text(
        "def reward(prompts, completions, **columns):\n"
        "    return [len(c if isinstance(c, str) else c[0]['content']) / 10 for c in completions]\n"
    )
    settings = GrpoSettings(rewards=[{"name": "answer"}, str(chars), "length"])
    run = GrpoRun(
        prompts=PromptSet.build(examples, tokenizer),
        rewards=build_rewards(settings.rewards, 8),
        sampling=Sampling(num_generations=G, max_new_tokens=8, temperature=1.0, top_p=1.0),
        loss=GrpoLoss(beta=beta, loss_type="dapo", scale_rewards="group", mask_truncated_completions=False),
        generation_batch=8,
        tokenizer=tokenizer,
        eos_ids=end_of_sequence_ids(tokenizer, model),
        events=EventWriter(tmp_path / "events.jsonl"),
        samples=CompletionsLog(tmp_path / "completions.jsonl"),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, optimizer, run


def _inputs(model: Any, optimizer: Any, run: GrpoRun, rows: list[int], micro: int = 4) -> StepInputs:
    return StepInputs(model, optimizer, [[r] for r in rows], run, micro, 0, "cpu", None, 1.0)


def _live_tensor_bytes() -> int:
    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and id(obj) not in seen:
                seen.add(id(obj))
                total += obj.untyped_storage().nbytes()
        except Exception:  # objects that fail is_tensor checks (proxies): not tensors
            continue
    return total


def test_a_step_samples_scores_learns_and_logs(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, optimizer, run = _setup(tiny_model_dir, tmp_path, beta=0.04, random_lora=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = grpo_step(_inputs(model, optimizer, run, [0, 6]))
    print(f"\nmetrics: {result.metrics}")
    assert result.metrics is not None
    # every figure the contract declares, in its order: what the views chart (engine.contract.grpo_figures)
    assert list(result.metrics) == step_figures(["answer", "chars", "length"], with_kl=True)
    assert result.metrics["frac_reward_zero_std"] < 1 and result.metrics["kl"] > 0
    assert result.metrics["timing/sampling_s"] > 0  # the step's sampling is timed, apart from its learning
    assert result.tokens > 0 and result.grad_norm > 0
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the optimizer stepped"
    lines = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == G and {x["step"] for x in lines} == {1}
    assert set(lines[0]["rewards"]) == {"answer", "chars", "length"} and "advantage" in lines[0]
    assert lines[0]["prompt"] == "What is 0 plus 0?"


def test_a_retried_step_reuses_its_completions_and_back_off_is_said(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model, optimizer, run = _setup(tiny_model_dir, tmp_path)
    first = run.rollout(model, [1, 2], "cpu", None)
    assert run.rollout(model, [1, 2], "cpu", None) is first  # the loop retries a step after an OOM
    result = grpo_step(_inputs(model, optimizer, run, [1, 2], micro=2))  # ... at a smaller micro-batch
    assert result.metrics is not None and run.steps_done == 1
    assert run.rollout(model, [1, 2], "cpu", None) is not first  # a new step samples anew

    calls: list[int] = []
    real = model.generate

    def short_of_memory(*args: Any, **kwargs: Any) -> Any:  # no GPU here: the error a full card raises
        calls.append(kwargs["input_ids"].shape[0])
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    model.generate = short_of_memory
    run._pending = None
    rollout = run.rollout(model, [3], "cpu", None)
    assert calls == [4, 4]  # the batch of 8 would hold the prompt's 4: halved to 4, the same chunk again
    assert len(rollout.completion_ids) == G and run.generation_batch == 4
    warnings = [e for e in read_events(tmp_path / "events.jsonl")[0] if e.type == "warning"]
    assert warnings and "generation batch halved" in warnings[0].message


class _AllocationLevel:
    """Torch's CPU allocations over a run, from the profiler's record of every allocation and free
    (``profile_memory``): the level is the bytes allocated and not yet freed since the first profiled step
    began; each step's peak is the highest the level reached inside that step, and its end the level it
    left. (tracemalloc sees Python's heap only, not the memory of torch's tensors.)"""

    def __init__(self) -> None:
        self.level = 0
        self.peaks: list[int] = []
        self.ends: list[int] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield
        # kineto's raw events keep each allocation (+bytes) and free (-bytes) in order; the FunctionEvents
        # of prof.events() fold them into their ops
        changes = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        peak = self.level
        for _, nbytes in changes:
            self.level += nbytes
            peak = max(peak, self.level)
        self.peaks.append(peak)
        self.ends.append(self.level)


def test_memory_does_not_grow_step_over_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Over 20 steps: the allocator's peak inside each step (torch's allocations, from the profiler), the
    tensors alive after each step, and the Python heap's peak during each step (tracemalloc) stay where
    the first steps put them (Adam's state appears at the first step)."""
    model, optimizer, run = _setup(tiny_model_dir, tmp_path, beta=0.04)
    allocations = _AllocationLevel()
    tensors: list[int] = []
    peaks: list[int] = []
    tracemalloc.start()
    try:
        for step in range(20):
            tracemalloc.reset_peak()
            with allocations.step():
                grpo_step(_inputs(model, optimizer, run, [step % 7, (step + 3) % 7]))
            peaks.append(tracemalloc.get_traced_memory()[1])
            tensors.append(_live_tensor_bytes())
    finally:
        tracemalloc.stop()
    print(
        f"\ntorch's allocation peak per step (bytes above the start): {allocations.peaks}"
        f"\n... and the level each step left: {allocations.ends}"
        f"\nlive tensor bytes per step: {tensors}\npython heap peak per step: {peaks}"
    )
    # Steps 10-19 sample the same prompt pairs as steps 3-12 (they repeat every 7 steps), so a step's peak
    # repeats, lower only where a completion ended early (random weights rarely end one). A leak shows twice:
    # in the level a step leaves, which must not move once Adam's state exists (step 1 on), and in the
    # peaks, which may not rise by more than 64 KiB (room for a completion longer than the same pair's
    # before, not for memory kept step after step).
    assert max(allocations.peaks[10:]) <= max(allocations.peaks[:10]) + 64 * 1024, "torch's peak grows"
    assert len(set(allocations.ends[1:])) == 1, "a step keeps torch memory after it ends"
    assert max(tensors[2:]) == min(tensors[2:]), "tensors kept from step to step"
    assert max(peaks[10:]) <= max(peaks[:10]) * 1.2 + 256 * 1024, "the Python heap's peak grows"
    lines = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 20 * G


def test_out_of_memory_lowers_the_generation_batch_then_the_micro_batch(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the CUDA out-of-memory errors are raised by stand-ins, once while sampling and once
    while learning. Sampling backs off in the step (its batch halved); learning in the loop (the
    micro-batch halved), which retries the step with the completions already sampled."""
    from engine.contract.spec import TrainSettings
    from engine.models.presets import model_shape
    from engine.planning.grpo import resolve_grpo
    from engine.training import grpo_step as step_module
    from engine.training.loop import train_adapter

    model, _, run = _setup(tiny_model_dir, tmp_path)
    train = TrainSettings(steps=2, micro_batch_size=4, gradient_accumulation=2, learning_rate=1e-3)
    resolved, _, _ = resolve_grpo(
        train, GrpoSettings(rewards=["length"], num_generations=G, max_completion_length=8, generation_batch_size=8),
        prompt_lengths=run.prompts.lengths, shape=model_shape(str(tiny_model_dir)), quantization="none",
        lora_rank=4, device="cpu", free_memory_gib=None,
    )  # fmt: skip
    generated: list[int] = []
    real_generate, real_logps = model.generate, step_module.completion_logps

    def generate(*args: Any, **kwargs: Any) -> Any:
        generated.append(kwargs["input_ids"].shape[0])
        if len(generated) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, sampling)")
        return real_generate(*args, **kwargs)

    failed: list[bool] = []

    def logps(model_: Any, *args: Any) -> Any:
        if torch.is_grad_enabled() and not failed:
            failed.append(True)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, learning)")
        return real_logps(model_, *args)

    model.generate = generate
    monkeypatch.setattr(step_module, "completion_logps", logps)
    with EventWriter(tmp_path / "loop.jsonl") as events:
        run.events = events
        out = train_adapter(
            model, run.tokenizer, run, resolved, device="cpu", events=events, step_fn=grpo_step
        )
    warnings = [e.message for e in read_events(tmp_path / "loop.jsonl")[0] if e.type == "warning"]
    print(f"\ngenerate batches: {generated}\nwarnings: {warnings}")
    assert out.steps_done == 2 and out.micro_batch_size == 2 and out.gradient_accumulation == 4
    assert "generation batch halved to 4" in warnings[0] and "micro-batch halved to 2" in warnings[1]
    assert generated == [8, 4, 4, 4, 4]  # step 1: 8 fails, 4 + 4; the retry samples nothing; step 2: 4 + 4
