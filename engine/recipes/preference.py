"""A preference fine-tune (method dpo, kto or orpo), top to bottom.

data (pairs, or judged answers) -> tokenizer -> sequences of each unit -> the two lengths and the smart
defaults (refuse what won't fit) -> base model (NF4 / 16-bit / fp32) -> LoRA (fresh, or init_adapter's)
-> the reference (a frozen copy of init_adapter, or the base with the adapter off) and its log-probabilities,
once -> the training loop with the method's step (engine.training.preference_step) -> held-out reward
accuracy -> adapter

The loop is the supervised recipe's (OOM back-off, heat pauses, cancel, checkpoints and resume, progress
events with the method's figures in ``Progress.metrics``); the adapter is a plain PEFT folder, so
try_model and export_gguf take it as they take any other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from engine.contract.events import EventWriter
from engine.contract.spec import ADAPTER_DIR, CHECKPOINT_DIR, FinetuneSpec, JobResult
from engine.models.adapters import initial_adapter
from engine.planning.preference import rows_per_unit
from engine.training import accel
from engine.training.backend import backend_name
from engine.training.loading import job_device, load_with_held_out
from engine.training.loop import TrainOutcome, train_adapter
from engine.training.lora import load_lora_model, save_adapter
from engine.training.preference_loading import PreparedPreference, prepare_preference
from engine.training.preference_objectives import Compute, Objective, objective_for
from engine.training.preference_step import PreferenceTrainStep, preference_evaluator
from engine.training.reference import attach_reference, reference_logps


def run_preference(
    spec: FinetuneSpec, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool]
) -> JobResult:
    device = job_device(spec.device, spec.gpu_index)
    examples, held_out = load_with_held_out(spec, events)
    prep = prepare_preference(spec, examples, held_out, device, events)
    resolved = prep.resolved
    model, info = load_lora_model(
        spec, device, resolved.gradient_checkpointing, events, resolved.offload_activations
    )
    pad_id = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    compute = Compute(pad_id, device, accel.autocast_dtype(device))
    objective = objective_for(spec.method, prep.train, spec.preference, compute)
    held = objective_for(spec.method, prep.held_out, spec.preference, compute) if prep.held_out else None
    # the reference pass takes a training micro-batch's rows at a time (engine.training.reference says why)
    rows = resolved.micro_batch_size * rows_per_unit(spec.method)
    reference = _reference(spec, model, [objective, *([held] if held else [])], compute, rows, events)
    step = PreferenceTrainStep(objective, micro=resolved.micro_batch_size)
    evaluator = preference_evaluator(held, model, lambda: step.micro, events)  # the run's micro-batch
    events.stage("training", total_steps=resolved.steps, method=spec.method)
    outcome = train_adapter(
        model,
        prep.tokenizer,
        cast(Any, prep.train),  # the loop plans over its ``lengths`` (units) and hands it to the step
        resolved,
        device=device,
        events=events,
        checkpoint_dir=job_dir / CHECKPOINT_DIR,
        cancel_check=cancel_check,
        safety=spec.safety,
        gpu_index=spec.gpu_index,
        evaluator=evaluator,
        step_fn=step,
    )
    eval_metrics: dict[str, float] = {}
    if evaluator is not None:
        events.stage("evaluating", examples=len(prep.held_out.units) if prep.held_out else 0)
        eval_metrics = evaluator(outcome.steps_done)
    events.stage("saving")
    if reference is not None:
        reference.release()  # the saved folder holds the trained adapter alone
    adapter = save_adapter(model, prep.tokenizer, job_dir / ADAPTER_DIR)
    metrics = {
        **_metrics(spec, prep, outcome, device, info),
        "reference": reference.describe() if reference is not None else None,
        **eval_metrics,
    }
    return JobResult(
        status="succeeded",
        kind=spec.kind,
        metrics=metrics,
        artifacts={"adapter": str(adapter.resolve())},
        loss_history=outcome.loss_history,
    )


def _reference(
    spec: FinetuneSpec,
    model: Any,
    objectives: list[Objective],
    compute: Compute,
    batch: int,
    events: EventWriter,
) -> Any:
    """The method's reference, said in the log, and its log-probabilities of every sequence, computed once."""
    if not objectives[0].needs_reference:
        events.log(
            f"{spec.method}: no reference model (the loss compares the answers under the trained model)"
        )
        return None
    init = initial_adapter(spec.init_adapter) if spec.init_adapter else None
    reference = attach_reference(model, init)
    events.log(f"reference: {reference.describe()}", reference="init_adapter" if init else "base")
    sequences = sum(len(o.reference_sequences()) for o in objectives)
    events.stage(
        "reference",
        sequences=sequences,
        batch=batch,
        message=f"reference log-probabilities of {sequences} sequences, {batch} per forward pass",
    )

    def backed_off(smaller: int) -> None:
        nonlocal batch
        batch = smaller
        events.warning(
            f"CUDA out of memory in the reference pass: {smaller} sequences per forward pass from here",
            reference_batch=smaller,
        )

    passes: list[tuple[int, float]] = []
    for objective in objectives:
        seqs = objective.reference_sequences()
        objective.set_reference(
            reference_logps(
                reference,
                objective.view,
                seqs,
                batch=batch,
                pad_id=compute.pad_id,
                device=compute.device,
                autocast_dtype=compute.autocast_dtype,
                on_back_off=backed_off,
                passes=passes,
            )  # fmt: skip
        )
    if passes:  # the first pass also compiles the head's kernel on a GPU: said apart
        total = sum(s for _, s in passes)
        events.log(
            f"reference log-probabilities: {sequences} sequences in {total:.2f} s, of which the first forward "
            f"pass ({passes[0][0]} sequences) {passes[0][1]:.2f} s",
            reference_s=round(total, 3), first_pass_s=round(passes[0][1], 3), first_pass_sequences=passes[0][0],
            sequences=sequences,
        )  # fmt: skip
    return reference


def _metrics(
    spec: FinetuneSpec, prep: PreparedPreference, outcome: TrainOutcome, device: str, info: dict[str, Any]
) -> dict[str, Any]:
    units = len(prep.train.units)
    per_step = outcome.micro_batch_size * outcome.gradient_accumulation
    return {
        "method": spec.method,
        "loss_type": spec.preference.loss_for(spec.method),
        "beta": spec.preference.beta,
        **outcome.figures(),
        ("pairs_per_s" if prep.train.paired else "examples_per_s"): round(
            outcome.steps_done * per_step / outcome.train_seconds if outcome.train_seconds > 0 else 0.0, 3
        ),
        "max_seq_length": prep.resolved.max_seq_length,
        "max_prompt_length": prep.max_prompt_length,
        "learning_rate": prep.resolved.learning_rate,
        "device": device,
        "backend": backend_name(info),
        "quantization": info.get("quantization"),
        ("pairs" if prep.train.paired else "examples"): units,
    }
