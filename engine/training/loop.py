"""The training loop: ``train_adapter`` trains the LoRA parameters for a fixed step plan.

The loop is our own rather than trl's SFTTrainer: it is short, and owning it lets us pack
without padding, compute the loss without full logits (engine.training.loss), back off on CUDA OOM,
pause for heat, and checkpoint/resume exactly. ``train_adapter`` is also the building block of
a SLAO series (engine.recipes.series), which trains one adapter per run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.contract.errors import JobCancelled
from engine.contract.events import Checkpoint, EventWriter, Progress
from engine.contract.spec import SafetySettings
from engine.data.tokenizing import Tokenized
from engine.hardware.gpus import GpuMonitor, ThermalGuard, wait_for_safe_gpu
from engine.planning.defaults import ResolvedTraining
from engine.training import accel
from engine.training.batching import StepPlan, most_pieces_per_row, plan_steps
from engine.training.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from engine.training.cuda_graphs import StepGraphs, why_not
from engine.training.fast_step import run_step  # no host sync inside the step; see that module
from engine.training.lora import switch_on_recomputation
from engine.training.ranks import active_rank


@dataclass
class TrainOutcome:
    steps_done: int
    loss_history: list[dict[str, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    peak_memory_gib: float | None = None
    micro_batch_size: int = 0
    gradient_accumulation: int = 0
    train_seconds: float = 0.0


@dataclass(frozen=True)
class RunPosition:
    """Where a training run sits in its job: run ``run`` of ``runs``, after ``step_offset`` earlier steps.

    A plain fine-tune is run 1 of 1 at offset 0; a series passes its own, so that progress events
    carry the run counter and a global step (one continuous x axis for the whole job).
    """

    run: int | None = None
    runs: int | None = None
    step_offset: int = 0


def _scheduler(optimizer: Any, kind: str, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def _gpu_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return None


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
) -> TrainOutcome:
    """Train the LoRA parameters of ``model`` in place for ``resolved.steps`` optimizer steps.

    Resumes from the newest checkpoint in ``checkpoint_dir`` when there is one.
    """
    torch.manual_seed(resolved.seed)
    random.seed(resolved.seed)
    micro = resolved.micro_batch_size
    rows_per_step = micro * resolved.gradient_accumulation
    rank = active_rank()  # None on one device; else this process is one DDP rank of several
    if rank is not None:
        rank.check_plan(rows_per_step)
    plan: StepPlan = plan_steps(
        data.lengths,
        max_seq_length=resolved.max_seq_length,
        packing=resolved.packing,
        rows_per_step=rows_per_step,
        total_steps=resolved.steps,
        seed=resolved.seed,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(
        params, lr=resolved.learning_rate, weight_decay=resolved.weight_decay, betas=(0.9, 0.999), fused=fused
    )
    scheduler = _scheduler(optimizer, resolved.lr_scheduler, resolved.warmup_steps, plan.total_steps)
    outcome = TrainOutcome(steps_done=0)
    start_step = 0
    if checkpoint_dir is not None and (ckpt := latest_checkpoint(checkpoint_dir)) is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        start_step = int(state["step"])
        outcome.loss_history = list(state.get("loss_history", []))
        micro = int(state.get("micro_batch_size", micro))
        events.log(f"resumed from checkpoint at step {start_step}", step=start_step)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast_dtype = accel.autocast_dtype(device)
    monitor = GpuMonitor(gpu_index) if device.startswith("cuda") else None
    guard = ThermalGuard(safety or SafetySettings())
    where = position or RunPosition()

    def checkpoint(step: int) -> None:
        if checkpoint_dir is None or (rank is not None and not rank.is_writer):
            return
        path = save_checkpoint(
            checkpoint_dir, step, model, optimizer, scheduler,
            {"loss_history": outcome.loss_history, "micro_batch_size": micro},
        )  # fmt: skip
        events.emit(Checkpoint(step=step, path=str(path), run=where.run))

    model.train()
    # one device: fast_step.run_step on the model; several: this rank's share through DDP
    step_fn, step_model = (rank.run_step, rank.wrap(model)) if rank is not None else (run_step, model)
    graphs: StepGraphs | None = None
    no_graphs = why_not(model, device, resolved, distributed=rank is not None)
    if no_graphs is None:
        graphs = StepGraphs(
            model, device, resolved.max_seq_length, resolved.packing, most_pieces_per_row(plan)
        )
    elif device.startswith("cuda") and getattr(resolved, "cuda_graphs", False):
        events.log(f"CUDA graphs not used: {no_graphs}", cuda_graphs=0)
    step_kwargs: dict[str, Any] = {"graphs": graphs} if graphs is not None else {}
    graphs_failure_told = False
    recomputing = getattr(resolved, "gradient_checkpointing", True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    t_begin = time.perf_counter()
    tokens_seen = 0
    step = start_step
    while step < plan.total_steps:
        if cancel_check():
            checkpoint(step)
            raise JobCancelled(f"cancelled at step {step} of {plan.total_steps}; a checkpoint was saved")
        wait_for_safe_gpu(
            monitor, guard, events, before=f"step {step + 1}", max_wait_s=guard.settings.max_pause_s,
            save_progress=lambda s=step: checkpoint(s),
        )  # fmt: skip
        rows = plan.steps[step]
        # one device: the next step is collated while the GPU runs this one (fast_step.run_step)
        ahead: dict[str, Any] = (
            {"next_rows": plan.steps[step + 1]} if rank is None and step + 1 < plan.total_steps else {}
        )
        t0 = time.perf_counter()
        try:
            loss_value, real_tokens, grad_norm = step_fn(
                step_model,
                optimizer,
                rows,
                data,
                micro,
                pad_id,
                device,
                autocast_dtype,
                resolved.max_grad_norm,
                **step_kwargs,
                **ahead,
            )
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError on torch >= 2.5; same class)
            optimizer.zero_grad(set_to_none=True)
            if graphs is not None:  # their shapes and memory were for the old micro-batch size
                graphs.reset()
            torch.cuda.empty_cache()
            # Recomputation skipped (the defaults do where memory seemed to allow it): switch it on
            # first, which keeps the batch; then halve the micro-batch. (One device: ranks back off alike.)
            if not recomputing and rank is None and switch_on_recomputation(model):
                recomputing = True
                events.warning(
                    f"CUDA out of memory without recomputation: gradient checkpointing switched on at "
                    f"micro-batch {micro} (same batch; each layer is recomputed in the backward pass from here)",
                    gradient_checkpointing=True,
                )
                continue
            if micro == 1 or (rank is not None and rank.sharded):  # FSDP ranks cannot back off alone
                raise RuntimeError(
                    f"CUDA out of memory at micro-batch {micro}: lower micro_batch_size or max_seq_length, "
                    "use quantization '4bit', or a smaller model"
                ) from None
            micro //= 2
            events.warning(
                f"CUDA out of memory: micro-batch halved to {micro}, gradient accumulation doubled to "
                f"{rows_per_step // micro} (same effective batch)",
                micro_batch_size=micro,
                gradient_accumulation=rows_per_step // micro,
            )
            continue
        scheduler.step()
        step += 1
        if graphs is not None and graphs.failure and not graphs_failure_told:
            events.warning(f"CUDA graph capture failed, stepping eagerly from here: {graphs.failure}")
            graphs_failure_told = True
        dt = time.perf_counter() - t0
        tokens_seen += real_tokens
        elapsed = time.perf_counter() - t_begin
        tps = tokens_seen / elapsed if elapsed > 0 else 0.0
        lr = scheduler.get_last_lr()[0]
        outcome.loss_history.append({"step": step, "loss": loss_value, "lr": lr})
        remaining = plan.total_steps - step
        sample = monitor.sample() if monitor else None
        events.emit(
            Progress(
                run=where.run,
                runs=where.runs,
                global_step=where.step_offset + step,
                step=step,
                total=plan.total_steps,
                loss=round(loss_value, 6),
                lr=lr,
                grad_norm=round(grad_norm, 6),
                tokens=real_tokens,
                tokens_per_s=round(tps, 1),
                step_s=round(dt, 4),
                eta_s=round(remaining * elapsed / max(1, step - start_step), 1),
                gpu_memory_gib=_gpu_memory_gib(device),
                gpu=sample,
            )
        )
        if resolved.checkpoint_every and step % resolved.checkpoint_every == 0 and step < plan.total_steps:
            checkpoint(step)
            if evaluator is not None:  # the held-out curve, at the same cadence as checkpoints
                evaluator(where.step_offset + step)
                model.train()
    if graphs is not None:
        events.log(graphs.summary(), cuda_graphs=graphs.captured, replayed=graphs.replays)
        graphs.reset()
        optimizer.zero_grad(set_to_none=True)  # kept allocated for the graphs; not needed any more
    outcome.steps_done = step
    outcome.train_seconds = time.perf_counter() - t_begin
    outcome.tokens_per_s = tokens_seen / outcome.train_seconds if outcome.train_seconds > 0 else 0.0
    outcome.peak_memory_gib = _gpu_memory_gib(device)
    outcome.micro_batch_size = micro
    outcome.gradient_accumulation = rows_per_step // micro
    return outcome
