"""The training loop: ``train_adapter`` trains the LoRA parameters for a fixed step plan.

The loop is our own rather than trl's SFTTrainer: it is short, and owning it lets us pack
without padding, compute the loss without full logits (engine.training.loss), back off on CUDA OOM,
pause for heat, and checkpoint/resume exactly. ``train_adapter`` is also the building block of
a SLAO series (engine.recipes.series), which trains one adapter per run.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import get_scheduler

from engine.contract.errors import JobCancelled
from engine.contract.events import Checkpoint, EventWriter, Progress
from engine.contract.spec import SafetySettings
from engine.data.tokenizing import Tokenized
from engine.hardware.gpus import GpuMonitor, ThermalGuard, wait_for_safe_gpu
from engine.planning.defaults import ResolvedTraining
from engine.training import accel
from engine.training.batching import StepPlan, most_pieces_per_row, plan_steps
from engine.training.checkpoints import CheckpointWriter, latest_checkpoint, load_checkpoint
from engine.training.cuda_graphs import StepGraphs, why_not
from engine.training.fast_step import run_step  # no host sync inside the step; see that module
from engine.training.lora import switch_on_recomputation
from engine.training.ranks import RankContext, active_rank
from engine.training.run_diagnostics import RunDiagnostics
from engine.training.step import StepInputs, StepResult, TrainStep


@dataclass
class TrainOutcome:
    steps_done: int
    loss_history: list[dict[str, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_gib: float | None = None
    micro_batch_size: int = 0
    gradient_accumulation: int = 0
    train_seconds: float = 0.0

    def figures(self) -> dict[str, Any]:
        """What a recipe reports of its training: the losses (the last few averaged), speed, memory, batch."""
        losses = [h["loss"] for h in self.loss_history]
        window = max(1, min(5, len(losses) // 4 or 1))
        return {
            "steps": self.steps_done,
            "first_loss": losses[0] if losses else math.nan,
            "final_loss": losses[-1] if losses else math.nan,
            "final_loss_avg": sum(losses[-window:]) / window if losses else math.nan,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "train_seconds": round(self.train_seconds, 2),
            "peak_gpu_memory_gib": self.peak_memory_gib,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation": self.gradient_accumulation,
        }


@dataclass(frozen=True)
class RunPosition:
    """Where a training run sits in its job: run ``run`` of ``runs``, after ``step_offset`` earlier steps.

    A plain fine-tune is run 1 of 1 at offset 0; a series passes its own, so that progress events
    carry the run counter and a global step (one continuous x axis for the whole job).
    """

    run: int | None = None
    runs: int | None = None
    step_offset: int = 0


def _gpu_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return None


@dataclass
class _Run:
    """One training run in motion: what the loop's parts share, and what OOM back-off changes
    (``micro``, ``recomputing``)."""

    model: Any
    optimizer: Any
    scheduler: Any
    plan: StepPlan
    device: str
    events: EventWriter
    checkpoint_dir: Path | None
    rank: RankContext | None
    where: RunPosition
    micro: int
    rows_per_step: int
    recomputing: bool
    outcome: TrainOutcome = field(default_factory=lambda: TrainOutcome(steps_done=0))
    tokens_seen: int = 0
    t_made: float = 0.0  # when train_adapter began
    t_begin: float = 0.0
    writer: CheckpointWriter | None = None
    steps_s: float = 0.0  # the loop's time inside its steps ...
    checkpoints_s: float = 0.0  # ... and waiting for checkpoints (their host copies; a write before a stop)

    def checkpoint(self, step: int, wait: bool = False) -> None:
        """Save a checkpoint of ``step``, written in the background unless ``wait`` (before the job stops)."""
        if self.checkpoint_dir is None or (self.rank is not None and not self.rank.is_writer):
            return
        began = time.perf_counter()
        if self.writer is None:
            self.writer = CheckpointWriter(self.checkpoint_dir)
        self.report_checkpoint(self.writer.wait())
        self.writer.save(
            step, self.model, self.optimizer, self.scheduler,
            {"loss_history": self.outcome.loss_history, "micro_batch_size": self.micro},
        )  # fmt: skip
        if wait:
            self.report_checkpoint(self.writer.wait())
        self.checkpoints_s += time.perf_counter() - began

    def report_checkpoint(self, written: tuple[int, Path] | None) -> None:
        """The event of a checkpoint whose write is over."""
        if written is not None:
            self.events.emit(Checkpoint(step=written[0], path=str(written[1]), run=self.where.run))

    def resume(self) -> int:
        """The step to start from: the newest checkpoint's (its state loaded), else 0."""
        if self.checkpoint_dir is None or (ckpt := latest_checkpoint(self.checkpoint_dir)) is None:
            return 0
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        step = int(state["step"])
        self.outcome.loss_history = list(state.get("loss_history", []))
        self.micro = int(state.get("micro_batch_size", self.micro))
        self.events.log(f"resumed from checkpoint at step {step}", step=step)
        return step

    def back_off(self, graphs: StepGraphs | None) -> None:
        """After a CUDA OOM, before the step is retried: less memory for the same effective batch."""
        self.optimizer.zero_grad(set_to_none=True)
        if graphs is not None:  # their shapes and memory were for the old micro-batch size
            graphs.reset()
        torch.cuda.empty_cache()
        # Recomputation skipped (the defaults do where memory seemed to allow it): switch it on
        # first, which keeps the batch; then halve the micro-batch. (One device: ranks back off alike.)
        if not self.recomputing and self.rank is None and switch_on_recomputation(self.model):
            self.recomputing = True
            self.events.warning(
                f"CUDA out of memory without recomputation: gradient checkpointing switched on at "
                f"micro-batch {self.micro} (same batch; each layer is recomputed in the backward pass from here)",
                gradient_checkpointing=True,
            )
            return
        if self.micro == 1 or (self.rank is not None and self.rank.sharded):  # FSDP: not one rank alone
            raise RuntimeError(
                f"CUDA out of memory at micro-batch {self.micro}: lower micro_batch_size or max_seq_length, "
                "use quantization '4bit', or a smaller model"
            ) from None
        self.micro //= 2
        self.events.warning(
            f"CUDA out of memory: micro-batch halved to {self.micro}, gradient accumulation doubled to "
            f"{self.rows_per_step // self.micro} (same effective batch)",
            micro_batch_size=self.micro,
            gradient_accumulation=self.rows_per_step // self.micro,
        )

    def report(
        self, step: int, start: int, result: StepResult, step_s: float, gpu: dict[str, Any] | None
    ) -> None:
        """The step's Progress event and its row of the loss history."""
        self.tokens_seen += result.tokens
        self.steps_s += step_s
        elapsed = time.perf_counter() - self.t_begin
        lr = self.scheduler.get_last_lr()[0]
        self.outcome.loss_history.append({"step": step, "loss": result.loss, "lr": lr})
        self.events.emit(
            Progress(
                run=self.where.run,
                runs=self.where.runs,
                global_step=self.where.step_offset + step,
                step=step,
                total=self.plan.total_steps,
                loss=round(result.loss, 6),
                lr=lr,
                grad_norm=round(result.grad_norm, 6),
                tokens=result.tokens,
                tokens_per_s=round(self.tokens_seen / elapsed if elapsed > 0 else 0.0, 1),
                step_s=round(step_s, 4),
                eta_s=round((self.plan.total_steps - step) * elapsed / max(1, step - start), 1),
                gpu_memory_gib=_gpu_memory_gib(self.device),
                gpu=gpu,
                metrics=result.metrics,
            )
        )

    def finish(self, step: int, graphs: StepGraphs | None) -> TrainOutcome:
        if self.writer is not None:  # the last checkpoint is on disk before the run counts as over
            self.report_checkpoint(self.writer.wait())
        if graphs is not None:
            self.events.log(graphs.summary(), cuda_graphs=graphs.captured, replayed=graphs.replays)
            graphs.reset()
            self.optimizer.zero_grad(set_to_none=True)  # kept allocated for the graphs; not needed any more
        out = self.outcome
        out.steps_done = step
        out.train_seconds = time.perf_counter() - self.t_begin
        self.events.log(  # where the loop's time went (the whole job's rate against the step rate)
            f"the loop: {out.train_seconds:.2f} s, {self.steps_s:.2f} s in steps, "
            f"{self.checkpoints_s:.2f} s on checkpoints, {self.t_begin - self.t_made:.2f} s setting up",
            loop_s=round(out.train_seconds, 3), steps_s=round(self.steps_s, 3),
            checkpoints_s=round(self.checkpoints_s, 3), setup_s=round(self.t_begin - self.t_made, 3),
            between_steps_s=round(out.train_seconds - self.steps_s - self.checkpoints_s, 3),
        )  # fmt: skip
        out.tokens_per_s = self.tokens_seen / out.train_seconds if out.train_seconds > 0 else 0.0
        out.peak_memory_gib = _gpu_memory_gib(self.device)
        out.micro_batch_size = self.micro
        out.gradient_accumulation = self.rows_per_step // self.micro
        return out


def train_adapter(
    model: Any,
    tokenizer: Any,
    data: Tokenized,
    resolved: ResolvedTraining,
    *,
    device: str,
    events: EventWriter,
    checkpoint_dir: Path | None = None,
    cancel_check: Callable[[], bool] = lambda: False,
    safety: SafetySettings | None = None,
    gpu_index: int = 0,
    position: RunPosition | None = None,
    evaluator: Callable[[int], Any] | None = None,
    step_fn: TrainStep | None = None,
) -> TrainOutcome:
    """Train the LoRA parameters of ``model`` in place for ``resolved.steps`` optimizer steps.

    ``step_fn`` is the objective: by default next-token loss (fast_step.run_step on one device, this
    rank's share of it through DDP/FSDP on several); a preference objective passes its own, which gets
    the bare model. Resumes from the newest checkpoint in ``checkpoint_dir`` when there is one.
    """
    made = time.perf_counter()  # the loop's set-up counts from here (its account, at the end)
    torch.manual_seed(resolved.seed)
    random.seed(resolved.seed)
    rows_per_step = resolved.micro_batch_size * resolved.gradient_accumulation
    rank = active_rank()  # None on one device; else this process is one DDP rank of several
    if rank is not None:
        rank.check_plan(rows_per_step)
    plan: StepPlan = plan_steps(
        data.lengths,
        max_seq_length=resolved.max_seq_length,
        packing=resolved.packing,
        rows_per_step=resolved.rows_per_step,  # (GRPO: prompts; its micro-batches count their completions)
        total_steps=resolved.steps,
        seed=resolved.seed,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=resolved.learning_rate, weight_decay=resolved.weight_decay, betas=(0.9, 0.999),
        fused=device.startswith("cuda"),
    )  # fmt: skip
    scheduler = get_scheduler(
        {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[resolved.lr_scheduler],
        optimizer, num_warmup_steps=resolved.warmup_steps, num_training_steps=plan.total_steps,
    )  # fmt: skip
    run = _Run(
        model, optimizer, scheduler, plan, device, events, checkpoint_dir, rank, position or RunPosition(),
        micro=resolved.micro_batch_size, rows_per_step=rows_per_step,
        recomputing=getattr(resolved, "gradient_checkpointing", True), t_made=made,
    )  # fmt: skip
    start_step = run.resume()
    model.train()
    graphs: StepGraphs | None = None
    step_model = model
    no_graphs = why_not(
        model, device, resolved, distributed=rank is not None, method_step=step_fn is not None
    )
    if step_fn is None:  # one device: fast_step.run_step on the model; several: this rank's share
        step_fn, step_model = (rank.run_share, rank.wrap(model)) if rank is not None else (run_step, model)
        if no_graphs is None:
            graphs = StepGraphs(
                model, device, resolved.max_seq_length, resolved.packing, most_pieces_per_row(plan)
            )
    if no_graphs is not None and device.startswith("cuda") and getattr(resolved, "cuda_graphs", False):
        events.log(f"CUDA graphs not used: {no_graphs}", cuda_graphs=0)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inputs = StepInputs(
        step_model, optimizer, [], data, run.micro, pad_id, device, accel.autocast_dtype(device),
        resolved.max_grad_norm, graphs,
    )  # fmt: skip
    monitor = GpuMonitor(gpu_index) if device.startswith("cuda") else None
    return _train_steps(
        run, step_fn, inputs, start_step, cancel_check, monitor, ThermalGuard(safety or SafetySettings()),
        resolved.checkpoint_every, evaluator,
    )  # fmt: skip


def _train_steps(
    run: _Run,
    step_fn: TrainStep,
    inputs: StepInputs,
    start: int,
    cancel_check: Callable[[], bool],
    monitor: GpuMonitor | None,
    guard: ThermalGuard,
    checkpoint_every: int | None,
    evaluator: Callable[[int], Any] | None,
) -> TrainOutcome:
    """The optimizer steps from ``start`` to the plan's end: one ``step_fn`` call each."""
    plan, events, graphs = run.plan, run.events, inputs.graphs
    if run.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(run.device)
    diagnostics = RunDiagnostics(run.device)  # only where the benchmarks ask for it
    run.t_begin = time.perf_counter()
    step, graphs_failure_told = start, False
    while step < plan.total_steps:
        if cancel_check():
            run.checkpoint(step, wait=True)
            raise JobCancelled(f"cancelled at step {step} of {plan.total_steps}; a checkpoint was saved")
        wait_for_safe_gpu(
            monitor, guard, events, before=f"step {step + 1}", max_wait_s=guard.settings.max_pause_s,
            save_progress=functools.partial(run.checkpoint, step, wait=True),
        )  # fmt: skip
        # one device: the next step is collated while the GPU runs this one (fast_step.run_step)
        ahead = plan.steps[step + 1] if run.rank is None and step + 1 < plan.total_steps else None
        diagnostics.before_step(step - start)
        t0 = time.perf_counter()
        try:
            result = step_fn(replace(inputs, rows=plan.steps[step], micro=run.micro, next_rows=ahead))
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError on torch >= 2.5; same class)
            run.back_off(graphs)
            continue
        run.scheduler.step()
        step += 1
        diagnostics.after_step(step - start)
        if graphs is not None and graphs.failure and not graphs_failure_told:
            events.warning(f"CUDA graph capture failed, stepping eagerly from here: {graphs.failure}")
            graphs_failure_told = True
        run.report(step, start, result, time.perf_counter() - t0, monitor.sample() if monitor else None)
        if run.writer is not None:
            run.report_checkpoint(run.writer.finished())
        if checkpoint_every and step % checkpoint_every == 0 and step < plan.total_steps:
            run.checkpoint(step)
            if evaluator is not None:  # the held-out curve, at the same cadence as checkpoints
                evaluator(run.where.step_offset + step)
                run.model.train()
    return run.finish(step, graphs)
