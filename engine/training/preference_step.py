"""One optimizer step of a preference job, and the held-out evaluation that uses the same maths.

The step's rows are units (pairs, or judged answers, engine.data.preference_tokens); each micro-batch of
``micro`` units is one forward pass over their sequences (a pair's chosen and rejected answers are rows of
the same micro-batch), and its share of the step's loss goes backward at once, so only one micro-batch's
activations are alive. The loss is the mean over the step's units whatever the micro-batch, so the loop's
out-of-memory back-off (which halves ``micro``) changes the memory and nothing else, except for kto, whose
reference point is each micro-batch's own (as in trl's KTOTrainer under gradient accumulation). One host
sync ends the step: the loss, the gradient norm and the method's figures (trl's names: ``rewards/chosen``,
``rewards/accuracies``, ``logps/rejected``, ...) come back together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.contract.events import Eval
from engine.training.fused_lora import weights_updated
from engine.training.preference_objectives import Objective
from engine.training.step import StepInputs, StepResult


@dataclass
class PreferenceStepResult:
    loss: float
    tokens: int
    grad_norm: float
    metrics: dict[str, float]


def step_totals(
    objective: Objective, model: Any, units: list[int], micro: int, *, train: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The units' loss (backward after each micro-batch when ``train``), figure sums and tokens."""
    objective.start_step(units)
    loss = torch.zeros((), device=objective.c.device)
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for i in range(0, len(units), micro):
        part, figures, real = objective.micro_loss(model, units[i : i + micro])
        if train:
            part.backward()
        loss += part.detach()
        tokens += real
        for k, v in figures.items():
            sums[k] = sums[k] + v if k in sums else v.detach().float().clone()
    return loss, sums, tokens


def preference_step(
    objective: Objective, model: Any, optimizer: Any, units: list[int], micro: int, max_grad_norm: float
) -> PreferenceStepResult:
    """Forward and backward over ``units`` in micro-batches of ``micro``, one optimizer step."""
    weights_updated()  # LoRA weights may have been written between steps (resume)
    loss, sums, tokens = step_totals(objective, model, units, micro, train=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    weights_updated()  # the fused LoRA layers' cast copies are stale now
    optimizer.zero_grad(set_to_none=True)
    names = list(sums)
    values = torch.stack([loss, grad_norm.float(), *(sums[k] for k in names)]).tolist()  # the one sync
    metrics = objective.means(dict(zip(names, values[2:], strict=True)), len(units))
    return PreferenceStepResult(values[0], tokens, values[1], {k: round(v, 6) for k, v in metrics.items()})


@torch.no_grad()
def preference_scores(objective: Objective, model: Any, units: list[int], micro: int) -> dict[str, float]:
    """The method's loss (``loss``) and figures on ``units`` (held-out), without gradients; ``model`` is left
    in eval mode."""
    model.eval()
    loss, sums, _ = step_totals(objective, model, units, micro, train=False)
    names = list(sums)
    values = torch.stack([loss, *(sums[k] for k in names)]).tolist()
    return {"loss": values[0], **objective.means(dict(zip(names, values[1:], strict=True)), len(units))}


@dataclass
class PreferenceTrainStep:
    """The loop's step (engine.training.step) for ``objective``: a row of the plan is one unit. ``micro`` is
    the micro-batch of its latest step (the loop's out-of-memory back-off lowers it), for the evaluation."""

    objective: Objective
    micro: int

    def __call__(self, inputs: StepInputs) -> StepResult:
        self.micro = inputs.micro
        units = [u for row in inputs.rows for u in row]
        r = preference_step(
            self.objective, inputs.model, inputs.optimizer, units, inputs.micro, inputs.max_grad_norm
        )
        return StepResult(loss=r.loss, tokens=r.tokens, grad_norm=r.grad_norm, metrics=r.metrics)


def preference_evaluator(
    objective: Objective | None, model: Any, micro: Callable[[], int], events: Any
) -> Callable[[int], dict[str, float]] | None:
    """A function that scores the held-out units at a global step and records an ``Eval`` event: the method's
    loss, and its figures (``rewards/accuracies``, ...) in ``Eval.metrics``. None without held-out units.
    ``micro`` says the run's micro-batch at the time (after an out-of-memory back-off, the smaller one)."""
    if objective is None:
        return None
    units = list(range(len(objective.data.units)))

    def evaluate(global_step: int) -> dict[str, float]:
        scores = preference_scores(objective, model, units, micro())
        loss = scores.pop("loss")
        events.emit(Eval(global_step=global_step, loss=loss, examples=len(units), metrics=scores))
        return {"eval_loss": loss, **{f"eval_{k}": v for k, v in scores.items()}}

    return evaluate
