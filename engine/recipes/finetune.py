"""One LoRA / QLoRA fine-tune: the recipe, top to bottom.

data -> tokenizer -> tokenized examples -> smart defaults (refuse what won't fit)
     -> base model (NF4 / 16-bit / fp32) -> speed-ups -> LoRA -> training loop
     -> held-out evaluation -> adapter
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.contract.events import EventWriter
from engine.contract.spec import ADAPTER_DIR, CHECKPOINT_DIR, FinetuneSpec, JobResult
from engine.training.backend import backend_name
from engine.training.evaluation import held_out_evaluator
from engine.training.loading import job_device, load_with_held_out, prepare_training
from engine.training.loop import train_adapter
from engine.training.lora import load_lora_model, save_adapter
from engine.training.ranks import active_rank


def run_finetune(
    spec: FinetuneSpec, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool]
) -> JobResult:
    device = job_device(spec.device, spec.gpu_index)
    examples, held_out = load_with_held_out(spec, events)
    tokenizer, data, resolved = prepare_training(spec, examples, device, events)

    model, info = load_lora_model(
        spec, device, resolved.gradient_checkpointing, events, resolved.offload_activations
    )

    writer = (rank := active_rank()) is None or rank.is_writer  # of several ranks, rank 0 alone writes
    evaluator = (  # under FSDP every forward is a collective: every rank evaluates (rank 0 reports)
        held_out_evaluator(model, tokenizer, held_out, resolved.max_seq_length, device, events)
        if writer or (rank is not None and rank.sharded)
        else None
    )
    events.stage("training", total_steps=resolved.steps)
    outcome = train_adapter(
        model,
        tokenizer,
        data,
        resolved,
        device=device,
        events=events,
        checkpoint_dir=job_dir / CHECKPOINT_DIR,
        cancel_check=cancel_check,
        safety=spec.safety,
        gpu_index=spec.gpu_index,
        evaluator=evaluator,
    )
    eval_metrics: dict[str, float] = {}
    if evaluator is not None:
        events.stage("evaluating", examples=len(held_out))
        eval_metrics = evaluator(outcome.steps_done)
    events.stage("saving")
    adapter = save_adapter(model, tokenizer, job_dir / ADAPTER_DIR) if writer else job_dir / ADAPTER_DIR
    metrics = {
        **outcome.figures(),
        "max_seq_length": resolved.max_seq_length,
        "learning_rate": resolved.learning_rate,
        "packing": resolved.packing,
        "device": device,
        "backend": backend_name(info),
        "quantization": info.get("quantization"),
        "examples": len(data.input_ids),
        **eval_metrics,
    }
    return JobResult(
        status="succeeded",
        kind=spec.kind,
        metrics=metrics,
        artifacts={"adapter": str(adapter.resolve())},
        loss_history=outcome.loss_history,
    )
