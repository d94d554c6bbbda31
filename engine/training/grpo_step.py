"""One GRPO optimizer step, as the training loop calls a step: sample, score, then learn from the scores.

The loop (engine.training.loop) hands the step the prompts it plans for this step (rows of one prompt
index each) and the micro-batch size, in completions; the step

1. samples ``num_generations`` completions of each prompt with the model as it is (engine.training.
   grpo_generate; an out-of-memory error there halves the generation batch, said in a warning),
2. scores them with the job's rewards and normalises the rewards within each prompt's group
   (engine.training.grpo_rollout),
3. runs the completions through the model in micro-batches, trl's GRPO loss on each (engine.training.
   grpo_loss; the reference pass, with ``beta`` > 0, is the same forward with the adapter switched off,
   or the initial adapter's frozen copy), accumulates the gradients, and steps the optimizer once.

A CUDA out-of-memory error in part 3 reaches the loop, which lowers the micro-batch and calls the step
again: the step's rollout is kept for that retry (same prompts), so nothing is sampled twice and the
retried step learns from the same completions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.contract import grpo_figures as figures
from engine.contract.events import EventWriter
from engine.rewards.scoring import Reward
from engine.training.fused_lora import weights_updated
from engine.training.grpo_batch import collate_completions
from engine.training.grpo_generate import Sampling, generate_completions
from engine.training.grpo_loss import completion_logps, policy_loss
from engine.training.grpo_rollout import PromptSet, Rollout, rollout_metrics, score_completions
from engine.training.grpo_samples import CompletionsLog
from engine.training.step import StepInputs, StepResult


@dataclass
class GrpoLoss:
    beta: float
    loss_type: str
    scale_rewards: str
    mask_truncated_completions: bool


@dataclass
class GrpoRun:
    """What a GRPO step needs besides the loop's inputs: the loop passes it as the step's ``data``."""

    prompts: PromptSet
    rewards: list[Reward]
    sampling: Sampling
    loss: GrpoLoss
    generation_batch: int
    tokenizer: Any
    eos_ids: list[int]
    events: EventWriter
    samples: CompletionsLog | None = None
    steps_done: int = 0
    reward_history: list[float] = field(default_factory=list)  # each step's mean reward (the job's result)
    sampling_s: float = 0.0  # the last rollout's sampling time (kept with it for a retried step)
    # the reference policy's context (beta > 0): the adapter switched off, or the initial adapter's copy
    reference: Callable[[Any], AbstractContextManager[Any]] = lambda model: model.disable_adapter()
    _pending: tuple[tuple[int, ...], Rollout] | None = field(default=None, repr=False)

    @property
    def lengths(self) -> list[int]:  # the loop plans its steps over the prompts' lengths
        return self.prompts.lengths

    def rollout(self, model: Any, chosen: list[int], device: str, dtype: Any) -> Rollout:
        """The step's completions and their scores (kept while the step is retried after an OOM)."""
        key = tuple(chosen)
        if self._pending is not None and self._pending[0] == key:
            return self._pending[1]

        def backed_off(batch: int) -> None:
            self.events.warning(
                f"CUDA out of memory while generating: generation batch halved to {batch} completions",
                generation_batch_size=batch,
            )

        def fell_back(why: str) -> None:
            self.events.warning(f"grpo_sampling_graphs: cannot sample this way ({why}); using generate")

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]
        began = time.perf_counter()  # (sampling ends in a host copy of the tokens: no sync needed)
        generated = generate_completions(
            model, [self.prompts.ids[i] for i in chosen], self.sampling, batch=self.generation_batch,
            pad_id=pad, eos_ids=self.eos_ids, device=device, autocast_dtype=dtype, on_back_off=backed_off,
            on_fallback=fell_back,
        )  # fmt: skip
        self.sampling_s = time.perf_counter() - began
        self.generation_batch = generated.batch
        rollout = score_completions(
            self.prompts, chosen, generated, self.sampling.num_generations, self.rewards, self.tokenizer,
            self.loss.scale_rewards,
        )  # fmt: skip
        self._pending = (key, rollout)
        return rollout

    def done(self, rollout: Rollout, metrics: dict[str, float]) -> None:
        self._pending = None
        self.steps_done += 1
        if figures.REWARD in metrics:
            self.reward_history.append(metrics[figures.REWARD])
        if self.samples is not None:
            self.samples.add(self.steps_done, self.prompts.prompts, rollout, self.sampling.num_generations)


@dataclass
class _Totals:
    loss: torch.Tensor
    kl: torch.Tensor
    kl_tokens: int = 0
    tokens: int = 0


def grpo_step(inputs: StepInputs) -> StepResult:
    """One GRPO optimizer step (a ``TrainStep``): see the module docstring."""
    run: GrpoRun = inputs.data
    model, device, dtype = inputs.model, inputs.device, inputs.autocast_dtype
    weights_updated()  # LoRA weights may have been written between steps (resume)
    rollout = run.rollout(model, [row[0] for row in inputs.rows], device, dtype)
    model.train()
    keep = [not (run.loss.mask_truncated_completions and t) for t in rollout.truncated]
    step_tokens = sum(len(c) for c, k in zip(rollout.completion_ids, keep, strict=True) if k)
    totals = _Totals(torch.zeros((), device=device), torch.zeros((), device=device))
    for start in range(0, len(rollout.completion_ids), inputs.micro):
        _micro_batch(run, rollout, inputs, slice(start, start + inputs.micro), keep, step_tokens, totals)
    params = [p for g in inputs.optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, inputs.max_grad_norm)
    inputs.optimizer.step()
    weights_updated()  # the fused LoRA layers' cast copies are stale now
    inputs.optimizer.zero_grad(set_to_none=True)
    loss, norm, kl = torch.stack([totals.loss, grad_norm.float(), totals.kl]).tolist()
    metrics = rollout_metrics(rollout, run.rewards)
    # where a GRPO step's time goes: sampling or learning
    metrics[figures.SAMPLING_SECONDS] = round(run.sampling_s, 3)
    if run.loss.beta != 0.0 and totals.kl_tokens:
        metrics[figures.KL] = round(kl / totals.kl_tokens, 6)
    run.done(rollout, metrics)
    return StepResult(loss=loss, tokens=totals.tokens, grad_norm=norm, metrics=metrics)


def _micro_batch(
    run: GrpoRun,
    rollout: Rollout,
    inputs: StepInputs,
    part: slice,
    keep: list[bool],
    step_tokens: int,
    totals: _Totals,
) -> None:
    """Forward and backward over one micro-batch of the step's completions."""
    model, device, dtype = inputs.model, inputs.device, inputs.autocast_dtype
    in_part = range(len(rollout.completion_ids))[part]
    part_size = len(in_part)
    rows = [i for i in in_part if keep[i]]
    if not rows:  # every completion here was cut off and left out (mask_truncated_completions)
        return
    b = collate_completions(
        [run.prompts.ids[rollout.prompt_index[i]] for i in rows], [rollout.completion_ids[i] for i in rows],
        inputs.pad_id, device,
    )  # fmt: skip
    args = (b.input_ids, b.position_ids, b.where, b.targets, b.mask, run.sampling.temperature)
    autocast = (
        torch.autocast(device.split(":")[0], dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )
    with autocast:
        ref = None
        if run.loss.beta != 0.0:
            with torch.no_grad(), run.reference(model):
                ref = completion_logps(model, *args)
        logps = completion_logps(model, *args)
        out = policy_loss(
            logps, b.mask, rollout.advantages.advantages[rows].to(device), ref, beta=run.loss.beta,
            loss_type=run.loss.loss_type, step_tokens=step_tokens, step_completions=len(rollout.completion_ids),
            max_completion_length=run.sampling.max_new_tokens, micro_completions=part_size,
        )  # fmt: skip
    out.loss.backward()
    totals.loss += out.loss.detach()
    totals.tokens += b.tokens
    if out.kl_sum is not None:
        totals.kl += out.kl_sum
        totals.kl_tokens += b.completion_tokens
