"""Smart defaults for a fine-tune (torch-free).

``resolve_training`` fills every setting the user left out (``None`` in ``TrainSettings``) and
says why, and refuses with :class:`DoesNotFitError` — numbers included — when even one sequence
per micro-batch cannot fit in the free memory (estimated by ``engine.planning.memory``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from pydantic import ConfigDict, Field, create_model

from engine.contract.spec import TrainSettings
from engine.models.shape import ModelShape
from engine.planning.fitting import FitCheck, decide_offload, decide_recompute
from engine.planning.memory import MemoryEstimate, fits, liger_kernels_apply

TARGET_EXAMPLES_PER_STEP = 16
MIN_SEQ_LENGTH = 64  # the shortest sequence length the defaults choose
MAX_DEFAULT_STEPS = 5000


def _decided(kind: Any) -> Any:
    """A setting's type once decided: ``X | None`` is ``X`` (None, 'choose for me', has been chosen)."""
    if get_origin(kind) not in (Union, UnionType):
        return kind
    return Union[tuple(a for a in get_args(kind) if a is not type(None))]  # noqa: UP007 - a runtime tuple


# Every field of TrainSettings, with its decided type: the resolved plan declares no setting of its own.
_DECIDED: dict[str, Any] = {
    name: (_decided(info.annotation), Field(description=info.description))
    for name, info in TrainSettings.model_fields.items()
}
_DecidedTraining: Any = create_model("DecidedTraining", __config__=ConfigDict(extra="forbid"), **_DECIDED)


class ResolvedTraining(_DecidedTraining):
    """Every ``TrainSettings`` field decided, with the reason for each (``reasons[field]``): what the loop runs.

    Its settings are TrainSettings' fields with ``None`` decided away, made when this module loads: pydantic
    checks their types; to mypy they are ``Any`` (nothing declares them twice).
    """

    reasons: dict[str, str]
    memory: MemoryEstimate | None  # None when there was no memory figure to check against
    rows_per_epoch: int  # training rows per pass (packed rows when packing)
    truncated_examples: int  # examples longer than max_seq_length

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...

    @property
    def rows_per_step(self) -> int:
        return int(self.micro_batch_size * self.gradient_accumulation)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.model_dump(exclude={"memory"}),
            "memory": self.memory.to_dict() if self.memory else None,
        }


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def percentile(values: list[int], pct: float) -> float:
    """Linear-interpolated percentile (pct in 0..100)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * pct / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _packed_rows(lengths: list[int], max_seq_length: int) -> int:
    # First-fit packing fills rows to ~95-100% when examples are short; counting tokens is close
    # enough for choosing step counts and cheap for any dataset size.
    total = sum(min(n, max_seq_length) for n in lengths)
    return max(1, math.ceil(total / (0.95 * max_seq_length)))


def default_learning_rate(shape: ModelShape, rank: int, device: str) -> tuple[float, str]:
    billions = shape.params / 1e9
    if billions < 0.1:
        return 1e-3, (
            f"{shape.params / 1e6:.1f}M-parameter model: small models tolerate and need a higher rate "
            "(1e-3) to learn within a short run"
        )
    if rank >= 64:
        return 1e-4, f"LoRA rank {rank} is high: 1e-4 instead of the usual 2e-4 keeps updates stable"
    if billions >= 30:
        return 1e-4, f"{billions:.0f}B-parameter model: 1e-4, lower than the usual 2e-4 for large models"
    return (
        2e-4,
        f"2e-4 is the usual LoRA/QLoRA rate for a {billions:.1f}B model at rank {rank} (alpha = 2*rank)",
    )


def _default_epochs(rows: int) -> tuple[float, str]:
    if rows <= 1000:
        return 3.0, f"{rows} rows per epoch is a small dataset: 3 epochs"
    if rows <= 10000:
        return 2.0, f"{rows} rows per epoch: 2 epochs"
    return 1.0, f"{rows} rows per epoch is a large dataset: 1 epoch"


def resolve_training(
    train: TrainSettings,
    *,
    n_examples: int,
    token_lengths: list[int],
    shape: ModelShape,
    quantization: str,
    lora_rank: int,
    device: str,
    free_memory_gib: float | None,
    lora_targets: list[str] | str = "all-linear",
    chunked_loss: bool = True,
    bf16_supported: bool = True,
    context_in_use: bool = False,
    shards: int = 1,
) -> ResolvedTraining:
    """Fill every ``None`` of ``train``; keep what the user gave. Raises DoesNotFitError.

    ``token_lengths``: tokens per example after templating, before truncation.
    ``free_memory_gib``: free memory on the device (None: unknown, no memory check).
    ``context_in_use``: the free figure was read by a process that already holds a CUDA
    context (``torch.cuda.mem_get_info``), so the context is not counted twice.
    """
    if n_examples < 1 or not token_lengths:
        raise ValueError("no training examples: the dataset has no usable rows")
    if len(token_lengths) != n_examples:
        raise ValueError(f"got {len(token_lengths)} token lengths for {n_examples} examples")
    device = "cuda" if device.startswith("cuda") else "cpu"
    est_kwargs: dict[str, Any] = {
        # Batch sizes are fitted with recomputation on unless it was switched off: the lean choice;
        # whether to skip it is decided afterwards, at the chosen batch (fitting.decide_recompute).
        "gradient_checkpointing": train.gradient_checkpointing is not False,
        "chunked_loss": chunked_loss,
        "lora_targets": lora_targets,
        "device": device,
        "bf16_supported": bf16_supported,
        "shards": shards,  # > 1: FSDP splits the base weights over that many cards
        # the native path's Liger kernels keep fewer activations (Unsloth's path does not take them)
        "liger_kernels": train.backend != "unsloth" and liger_kernels_apply(shape.model_type, device),
    }
    fit = FitCheck(shape, quantization, lora_rank, free_memory_gib or 0.0, context_in_use, est_kwargs)
    plan = _Plan(train, fit, free_memory_gib)
    plan.shape_rows(token_lengths, shape.max_context)
    plan.size_steps(device)
    plan.schedule(shape, lora_rank, device)
    plan.recomputation(shape, device)
    return plan.resolved()


@dataclass
class _Plan:
    """The settings of one run as they are decided, in order: each step reads what the earlier ones chose."""

    train: TrainSettings
    fit: FitCheck
    free_gib: float | None
    reasons: dict[str, str] = field(default_factory=dict)
    value: dict[str, Any] = field(default_factory=dict)  # every decided setting
    memory: MemoryEstimate | None = None
    rows: int = 0  # training rows per epoch
    truncated: int = 0
    target: int = 0  # rows per optimizer step to aim for
    target_note: str = ""

    def decide(self, name: str, default: Any, why: str) -> Any:
        """The user's value of ``name``, else ``default`` (because ``why``); recorded either way."""
        given = getattr(self.train, name)
        self.value[name], self.reasons[name] = (given, "given") if given is not None else (default, why)
        return self.value[name]

    def shape_rows(self, lengths: list[int], max_context: int) -> None:
        """Sequence length (cover the data, not the model's whole context), packing, rows per step."""
        p99 = percentile(lengths, 99)
        seq = max(MIN_SEQ_LENGTH, round_up(p99, 64))
        why = f"99th percentile of example lengths is {p99:.0f} tokens (longest {max(lengths)}), rounded up to a multiple of 64"
        if seq > max_context:
            seq, why = max_context, f"{why}, capped at the model's context of {max_context}"
        seq = self.decide("max_seq_length", seq, why)
        self.truncated = sum(1 for n in lengths if n > seq)
        if self.truncated:
            self.reasons["max_seq_length"] += (
                f"; {self.truncated} of {len(lengths)} examples are longer and will be cut"
            )
        # Padding-free packing wastes no compute on padding, on a GPU or a CPU alike.
        packing = self.decide(
            "packing", True, "on: short examples share a row (padding-free, positions restart per example)"
        )
        self.rows = _packed_rows(lengths, seq) if packing else len(lengths)
        # ~16 examples per step, but at least ~4 steps per epoch. Why ~16 examples, not "as many tokens as
        # the card holds": a step has a fixed cost (launches, the optimizer), so bigger steps are faster per
        # token on a GPU, but a small dataset then gets few updates per epoch; 16 is where common LoRA
        # recipes put the batch. Throughput is the step's job (engine.training.fast_step), not the batch's.
        mean_len = sum(min(n, seq) for n in lengths) / len(lengths)
        self.target = (
            max(1, round(TARGET_EXAMPLES_PER_STEP * mean_len / seq)) if packing else TARGET_EXAMPLES_PER_STEP
        )
        self.target_note = (
            f"about {TARGET_EXAMPLES_PER_STEP} examples per optimizer step: enough updates per epoch on small "
            "data; a larger step would be faster per token but update less often"
        )
        if self.target > max(1, self.rows // 4):
            self.target = max(1, self.rows // 4)
            self.target_note = (
                f"{self.target} rows per step, so that each epoch of {self.rows} rows has at least 4 steps"
            )

    def size_steps(self, device: str) -> None:
        """Micro-batch (the largest that fits, or the user's, checked), accumulation to reach the target."""
        train, fit, seq = self.train, self.fit, self.value["max_seq_length"]
        if train.micro_batch_size is not None and self.free_gib is not None:
            self.memory = fit.estimate(train.micro_batch_size, seq)
            if not fits(self.memory, self.free_gib, fit.context_in_use):
                raise fit.does_not_fit(train.micro_batch_size, seq, self.memory, user_micro=True)
        accum = train.gradient_accumulation
        limit = max(1, self.target if accum is None else math.ceil(self.target / accum))
        if self.free_gib is None or train.micro_batch_size is not None:
            micro = min(limit, 4)
            why = f"no free-memory figure on {device}: a small micro-batch of {micro}" + (
                " (CPU compute does not gain from larger ones)" if device == "cpu" else ""
            )
        else:
            micro = fit.largest_micro_batch(seq, limit=limit)
            if micro == 0:
                raise fit.does_not_fit(1, seq, fit.estimate(1, seq))
            self.memory = fit.estimate(micro, seq)
            # Sized with recomputation on unless the user turned it off; `recomputation` then drops it
            # where every layer's activations fit too, so the final estimate can be larger than this one.
            recomputing = self.memory.settings["gradient_checkpointing"]
            why = (
                f"largest power of two up to {limit} whose estimated peak"
                f"{' with recomputation' if recomputing else ''} ({self.memory.total_gib:.1f} GiB) fits in "
                f"{self.free_gib:.1f} GiB free"
            )
        micro = self.decide("micro_batch_size", micro, why)
        accum = max(1, round(self.target / micro))
        why = f"{micro} rows per micro-batch x {accum} = {micro * accum} rows per step ({self.target_note})"
        self.decide("gradient_accumulation", accum, why)

    def schedule(self, shape: ModelShape, lora_rank: int, device: str) -> None:
        """Steps and epochs, learning rate and warm-up, checkpoints."""
        train, rows = self.train, self.rows
        per_step = self.value["micro_batch_size"] * self.value["gradient_accumulation"]
        steps_per_epoch = max(1, math.ceil(rows / per_step))
        epochs, epochs_why = _default_epochs(rows) if train.epochs is None else (train.epochs, "given")
        steps = max(1, math.ceil(epochs * steps_per_epoch))
        why = f"{epochs:g} epochs x {steps_per_epoch} steps per epoch ({rows} rows, {per_step} per step)"
        capped = steps > MAX_DEFAULT_STEPS and train.epochs is None
        if capped:
            steps = MAX_DEFAULT_STEPS
            why += f", capped at {MAX_DEFAULT_STEPS} (set steps or epochs to train longer)"
        steps = self.decide("steps", steps, why)
        if train.steps is not None or capped:
            epochs, epochs_why = (
                steps * per_step / rows,
                f"implied by {steps} steps of {per_step} rows over {rows} rows per epoch",
            )
        self.value["epochs"], self.reasons["epochs"] = round(epochs, 4), epochs_why
        self.decide("learning_rate", *default_learning_rate(shape, lora_rank, device))
        warmup = max(1, round(0.04 * steps)) if steps >= 10 else round(0.04 * steps)
        self.decide("warmup_steps", warmup, f"about 4% of {steps} steps")
        # about five checkpoints per run, not more often than every 25 steps
        why = (
            f"about five checkpoints over {steps} steps, at least 25 steps apart"
            if steps > 25
            else f"a short run of {steps} steps: no intermediate checkpoint (one is written on cancel)"
        )
        self.decide("checkpoint_every", max(25, math.ceil(steps / 5)), why)

    def recomputation(self, shape: ModelShape, device: str) -> None:
        """Gradient checkpointing (skipped where every layer's activations fit), activation offload."""
        micro, seq = self.value["micro_batch_size"], self.value["max_seq_length"]
        recompute, self.reasons["gradient_checkpointing"], full = decide_recompute(
            self.train, self.fit, self.memory, micro, seq
        )
        self.memory = full or self.memory
        offload, self.reasons["offload_activations"] = decide_offload(
            self.train, recompute, shape, micro * seq, device
        )
        if offload and self.memory is not None:
            self.memory = self.fit.estimate(micro, seq, offload_activations=True)
        self.value.update(gradient_checkpointing=recompute, offload_activations=offload)

    def resolved(self) -> ResolvedTraining:
        """The plan, every other setting as given (or its default), each with its reason."""
        for name, info in TrainSettings.model_fields.items():
            if name not in self.value:
                self.value[name] = getattr(self.train, name)
                if self.value[name] is None:  # TrainSettings' None means "choose for me"
                    raise TypeError(
                        f"train.{name} was left to the defaults, which have no rule for it (defaults.py)"
                    )
                default = info.get_default(call_default_factory=True)
                self.reasons[name] = "default" if self.value[name] == default else "given"
        if self.memory is not None:
            self.reasons["micro_batch_size"] += f"; estimate at the chosen settings {self.memory.summary()}"
        return ResolvedTraining(
            **self.value,
            reasons=self.reasons,
            memory=self.memory,
            rows_per_epoch=self.rows,
            truncated_examples=self.truncated,
        )
