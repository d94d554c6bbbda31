"""What one optimizer step gets from the loop and gives back: the seam where an objective plugs in.

The loop (engine.training.loop) calls one ``TrainStep`` per optimizer step: next-token loss on one
device (engine.training.fast_step.run_step), one rank's share of it (``RankContext.run_share``), or
an objective's own (a preference loss computes its loss and returns its figures in ``metrics``).
The loop keeps what every objective shares: OOM back-off, cancel, heat pauses, checkpoints,
progress events and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.training.cuda_graphs import StepGraphs


@dataclass(frozen=True)
class StepInputs:
    """One optimizer step's work: the rows of ``data`` it trains on, in micro-batches of ``micro``."""

    model: Any  # the model, or its DDP/FSDP wrapper on several ranks
    optimizer: Any
    rows: list[list[int]]  # the step's rows, each a list of example indices into ``data``
    data: Any
    micro: int
    pad_id: int
    device: str
    autocast_dtype: torch.dtype | None
    max_grad_norm: float
    graphs: StepGraphs | None = None  # one device: micro-batches replayed from CUDA graphs
    next_rows: list[list[int]] | None = None  # one device: the next step's rows, collated ahead


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the step (next-token loss: per target token)
    tokens: int  # non-padding tokens trained on
    grad_norm: float  # before clipping
    metrics: dict[str, float] | None = None  # the objective's own figures, into Progress.metrics


TrainStep = Callable[[StepInputs], StepResult]  # a function, or an object with __call__
