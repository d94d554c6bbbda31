"""Fitting a run into the free memory (torch-free): one model's estimate tried at several batch shapes, the
refusal when nothing fits (with changes checked to fit), and the choices that trade compute or host
memory for GPU memory: recomputing each layer in the backward pass, offloading its checkpointed input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.contract.spec import TrainSettings
from engine.models.shape import ModelShape
from engine.planning.memory import (
    FREE_MEMORY_USABLE,
    MemoryEstimate,
    estimate_memory,
    fits,
    largest_micro_batch,
    storage_dtype,
)


class DoesNotFitError(ValueError):
    """Training cannot fit in the free memory even at one sequence per micro-batch."""

    def __init__(self, message: str, *, estimate: MemoryEstimate, free_gib: float, suggestions: list[str]):
        super().__init__(message)
        self.estimate = estimate
        self.free_gib = free_gib
        self.suggestions = suggestions


# Recomputation is skipped only where keeping every layer's activations leaves this share of the free
# memory unused: the estimate is an estimate, and another program may take some of the card later.
NO_RECOMPUTE_SHARE = 0.75
# Checkpointed layer inputs are moved to host memory by default only where they add up to this much
# (below it the copies save little; engine.training.offload), and only for models this large: CUDA
# graphs cannot capture the copies, and a smaller model's host-bound step gains far more from the graphs
# than from the memory freed, while a large model's GPU-bound step runs as fast either way.
OFFLOAD_MIN_GIB = 1.0
OFFLOAD_MIN_PARAMS = 3_000_000_000


def decide_recompute(
    train: TrainSettings, fit: FitCheck, memory: MemoryEstimate | None, micro: int, seq: int
) -> tuple[bool, str, MemoryEstimate | None]:
    """Whether to recompute each layer in the backward pass, why, and the estimate without it when off."""
    if train.gradient_checkpointing is not None:
        on = train.gradient_checkpointing
        what = (
            "on (recompute each layer in the backward pass)"
            if on
            else "off (keeps every layer's activations)"
        )
        return on, f"given: {what}", None
    if train.offload_activations:
        return True, "on: offload_activations=true moves its checkpointed layer inputs to host memory", None
    shards = fit.est_kwargs.get("shards", 1)
    if fit.est_kwargs.get("device") != "cuda" or memory is None or shards > 1:
        why = (
            "not on a GPU" if fit.est_kwargs.get("device") != "cuda"
            else f"sharded over {shards} cards" if shards > 1
            else "no free-memory figure to check against"
        )  # fmt: skip
        return True, f"on ({why}): recompute each layer in the backward pass, far less memory", None
    full = fit.estimate(micro, seq, gradient_checkpointing=False)
    budget = NO_RECOMPUTE_SHARE * fit.free_gib
    if full.total_gib <= budget:
        return (
            False,
            (
                f"off: keeping every layer's activations ({full.total_gib:.1f} GiB estimated) fits in "
                f"{NO_RECOMPUTE_SHARE:.0%} of the {fit.free_gib:.1f} GiB free, and skipping the recomputation "
                "saves about a third of the step's compute"
            ),
            full,
        )
    return (
        True,
        (
            f"on: keeping every layer's activations would need about {full.total_gib:.1f} GiB, more than "
            f"{NO_RECOMPUTE_SHARE:.0%} of the {fit.free_gib:.1f} GiB free; each layer is recomputed in the backward pass"
        ),
        None,
    )


def decide_offload(
    train: TrainSettings, recompute: bool, shape: ModelShape, micro_tokens: int, device: str
) -> tuple[bool, str]:
    """Whether to keep the checkpointed layer inputs in pinned host memory during the step, and why."""
    inputs_gib = shape.num_layers * micro_tokens * shape.hidden_size * 2 / 2**30
    if train.offload_activations is not None:  # (on without checkpointing is refused by TrainSettings)
        on = train.offload_activations and device == "cuda"
        return on, "given" + (": no effect off a GPU" if train.offload_activations and not on else "")
    if not recompute:
        return False, "off: no gradient checkpointing, so no checkpointed layer inputs"
    if device != "cuda":
        return False, "off: not on a GPU"
    if shape.params < OFFLOAD_MIN_PARAMS:
        return False, (
            f"off: a {shape.params / 1e9:.2g}B model steps faster with CUDA graphs, which cannot capture the copies"
        )
    if inputs_gib >= OFFLOAD_MIN_GIB:
        return True, (
            f"on: the {shape.num_layers} layers' checkpointed inputs ({inputs_gib:.2f} GiB) wait in pinned host "
            "memory, copied on a side stream while the card computes"
        )
    return (
        False,
        f"off: the checkpointed layer inputs are small ({inputs_gib:.2f} GiB, under {OFFLOAD_MIN_GIB:g})",
    )


@dataclass
class FitCheck:
    """One model, quantisation, rank and free-memory figure, tried at several batch shapes."""

    shape: ModelShape
    quantization: str
    rank: int
    free_gib: float
    context_in_use: bool
    est_kwargs: dict[str, Any]

    def estimate(
        self, micro: int, seq: int, quantization: str | None = None, **changed: Any
    ) -> MemoryEstimate:
        """The estimate at this shape; ``changed``: settings other than the ones being fitted."""
        q = quantization or self.quantization
        return estimate_memory(self.shape, q, self.rank, micro, seq, **(self.est_kwargs | changed))

    def fits(self, micro: int, seq: int, quantization: str | None = None) -> bool:
        return fits(self.estimate(micro, seq, quantization), self.free_gib, self.context_in_use)

    def largest_micro_batch(self, seq: int, limit: int) -> int:
        return largest_micro_batch(
            self.shape, self.quantization, self.rank, seq, self.free_gib,
            limit=limit, context_in_use=self.context_in_use, **self.est_kwargs,
        )  # fmt: skip

    def does_not_fit(
        self, micro: int, seq: int, estimate: MemoryEstimate, *, user_micro: bool = False
    ) -> DoesNotFitError:
        """The error, with concrete changes that would fit (each checked against the estimate)."""
        suggestions: list[str] = []
        if user_micro and micro > 1 and (best := self.largest_micro_batch(seq, limit=micro - 1)):
            suggestions.append(f"micro_batch_size={best} (raise gradient_accumulation to keep the batch)")
        shorter = next((s for s in range(seq - 64 - (seq % 64 or 0), 63, -64) if self.fits(1, s)), None)
        if shorter:
            suggestions.append(f"max_seq_length={shorter} (longer examples are cut)")
        if storage_dtype(self.quantization, self.est_kwargs.get("device", "cuda")) != "nf4" and self.fits(
            1, seq, "4bit"
        ):
            alt = self.estimate(1, seq, "4bit")
            suggestions.append(f'quantization="4bit" (QLoRA: about {alt.total_gib:.1f} GiB at micro-batch 1)')
        if not self.est_kwargs.get("gradient_checkpointing", True):
            suggestions.append("gradient_checkpointing=true")
        if self.rank > 8:
            suggestions.append(f"a lower LoRA rank (now {self.rank})")
        suggestions.append("a smaller model, or a GPU with more free memory (close other programs using it)")
        what = f"micro_batch_size={micro}" if user_micro else "even micro_batch_size=1"
        usable = self.free_gib * FREE_MEMORY_USABLE
        message = (
            f"training does not fit: {what} at max_seq_length={seq} needs about {estimate.total_gib:.1f} GiB "
            f"({estimate.summary()}) but {self.free_gib:.1f} GiB is free ({usable:.1f} GiB usable). Try: "
            + "; ".join(suggestions)
        )
        return DoesNotFitError(message, estimate=estimate, free_gib=self.free_gib, suggestions=suggestions)
