"""A GRPO job (method 'grpo'), top to bottom.

prompts (and their columns) -> tokenizer -> the settings for the card (completions per prompt, their
length, generation and micro-batches; refuse what won't fit) -> base model (NF4 / 16-bit / fp32) -> LoRA
(fresh, or init_adapter's, e.g. an SFT job's) -> the reference, with grpo_beta > 0 (a frozen copy of
init_adapter, or the base with the adapter off) -> the rewards (the user's file loaded here, in the
worker) -> the training loop with GRPO's step (engine.training.grpo_step) -> adapter

The loop is the supervised recipe's: OOM back-off, heat pauses, cancel, checkpoints and resume, progress
events with the rewards' figures in ``Progress.metrics`` (trl's names). What the model writes goes to
``completions.jsonl`` in the job folder (engine.training.grpo_samples); the adapter is a plain PEFT
folder, so try_model and export_gguf take it as they take any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from engine.contract.events import EventWriter
from engine.contract.grpo import COMPLETIONS_FILE
from engine.contract.spec import ADAPTER_DIR, CHECKPOINT_DIR, FinetuneSpec, JobResult, running_artifacts
from engine.models.adapters import initial_adapter
from engine.rewards.scoring import build_rewards
from engine.training.backend import backend_name
from engine.training.checkpoints import latest_checkpoint
from engine.training.grpo_generate import Sampling, end_of_sequence_ids
from engine.training.grpo_loading import PreparedGrpo, prepare_grpo
from engine.training.grpo_samples import CompletionsLog
from engine.training.grpo_step import GrpoLoss, GrpoRun, grpo_step
from engine.training.loading import job_device, load_dataset_logged
from engine.training.loop import TrainOutcome, train_adapter
from engine.training.lora import load_lora_model, save_adapter
from engine.training.reference import Reference, attach_reference


def run_grpo(
    spec: FinetuneSpec, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool]
) -> JobResult:
    device = job_device(spec.device, spec.gpu_index)
    events.stage("loading_data")
    examples = load_dataset_logged(spec.dataset, events, spec.method)
    prep = prepare_grpo(spec, examples, device, events)
    resolved, grpo = prep.resolved, prep.grpo
    model, info = load_lora_model(
        spec, device, resolved.gradient_checkpointing, events, resolved.offload_activations
    )
    reference = _reference(spec, model, events)
    rewards = build_rewards(grpo.rewards, int(grpo.max_completion_length or 0))
    events.log(
        "rewards: " + ", ".join(f"{r.label} (weight {r.weight:g})" for r in rewards),
        rewards=[r.label for r in rewards],
    )
    run = GrpoRun(
        prompts=prep.prompts,
        rewards=rewards,
        sampling=Sampling(
            int(grpo.num_generations or 0),
            int(grpo.max_completion_length or 0),
            grpo.temperature,
            grpo.top_p,
            grpo.sampling_graphs,
        ),
        loss=GrpoLoss(grpo.beta, grpo.loss_type, grpo.scale_rewards, grpo.mask_truncated_completions),
        generation_batch=int(grpo.generation_batch_size or 1),
        tokenizer=prep.tokenizer,
        eos_ids=end_of_sequence_ids(prep.tokenizer, model),
        events=events,
        samples=CompletionsLog(job_dir / COMPLETIONS_FILE),
    )
    if reference is not None:
        run.reference = lambda _model: reference.active()
    if (ckpt := latest_checkpoint(job_dir / CHECKPOINT_DIR)) is not None:  # a resumed job numbers on
        run.steps_done = int(ckpt.name.rsplit("-", 1)[-1])
    events.stage("training", total_steps=resolved.steps, method="grpo")
    # the loop plans over the run's ``lengths`` (a row: one prompt) and hands it to the step as its data
    outcome = train_adapter(
        model, prep.tokenizer, cast(Any, run), resolved, device=device, events=events,
        checkpoint_dir=job_dir / CHECKPOINT_DIR, cancel_check=cancel_check, safety=spec.safety,
        gpu_index=spec.gpu_index, step_fn=grpo_step,
    )  # fmt: skip
    events.stage("saving")
    if reference is not None:
        reference.release()  # the saved folder holds the trained adapter alone
    adapter = save_adapter(model, prep.tokenizer, job_dir / ADAPTER_DIR)
    return JobResult(
        status="succeeded",
        kind=spec.kind,
        metrics={**_metrics(spec, prep, run, outcome, device, info), **_reference_metric(reference)},
        artifacts={"adapter": str(adapter.resolve()), **running_artifacts(job_dir)},  # + completions.jsonl
        loss_history=outcome.loss_history,
    )


def _reference(spec: FinetuneSpec, model: Any, events: EventWriter) -> Reference | None:
    if spec.grpo.beta == 0.0:
        events.log("grpo_beta is 0: no reference model (no KL term, as trl's default)")
        return None
    init = initial_adapter(spec.init_adapter) if spec.init_adapter else None
    reference = attach_reference(model, init)
    events.log(f"reference: {reference.describe()}", reference="init_adapter" if init else "base")
    return reference


def _reference_metric(reference: Reference | None) -> dict[str, Any]:
    return {"reference": reference.describe() if reference is not None else None}


def _metrics(
    spec: FinetuneSpec,
    prep: PreparedGrpo,
    run: GrpoRun,
    outcome: TrainOutcome,
    device: str,
    info: dict[str, Any],
) -> dict[str, Any]:
    rewards = run.reward_history
    window = max(1, min(5, len(rewards) // 4 or 1))
    prompts = outcome.steps_done * prep.resolved.prompts_per_step
    seconds = outcome.train_seconds
    return {
        "method": "grpo",
        "steps": outcome.steps_done,
        "first_reward": rewards[0] if rewards else math.nan,
        "final_reward": rewards[-1] if rewards else math.nan,
        "final_reward_avg": sum(rewards[-window:]) / window if rewards else math.nan,
        "prompts_per_s": round(prompts / seconds, 4) if seconds > 0 else 0.0,
        "completions_per_s": round(prompts * run.sampling.num_generations / seconds, 4)
        if seconds > 0
        else 0.0,
        "train_seconds": round(seconds, 2),
        "peak_gpu_memory_gib": outcome.peak_memory_gib,
        "memory_estimate_gib": prep.memory.total_gib if prep.memory else None,
        "num_generations": run.sampling.num_generations,
        "max_completion_length": run.sampling.max_new_tokens,
        "generation_batch_size": run.generation_batch,
        "micro_batch_size": outcome.micro_batch_size,
        "gradient_accumulation": outcome.gradient_accumulation,
        "prompts_per_step": prep.resolved.prompts_per_step,
        "learning_rate": prep.resolved.learning_rate,
        "loss_type": spec.grpo.loss_type,
        "beta": spec.grpo.beta,
        "device": device,
        "backend": backend_name(info),
        "quantization": info.get("quantization"),
        "prompts": len(prep.prompts.ids),
    }
