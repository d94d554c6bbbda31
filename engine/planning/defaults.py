"""Smart defaults for a fine-tune (torch-free).

``resolve_training`` fills every setting the user left out (``None`` in ``TrainSettings``) and
says why, and refuses with :class:`DoesNotFitError` — numbers included — when even one sequence
per micro-batch cannot fit in the free memory (estimated by ``engine.planning.memory``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.contract.spec import TrainSettings
from engine.models.shape import ModelShape
from engine.planning.memory import (
    FREE_MEMORY_USABLE,
    MemoryEstimate,
    estimate_memory,
    fits,
    largest_micro_batch,
    liger_kernels_apply,
    storage_dtype,
)

TARGET_EXAMPLES_PER_STEP = 16
MIN_SEQ_LENGTH = 64  # the shortest sequence length the defaults choose


class DoesNotFitError(ValueError):
    """Training cannot fit in the free memory even at one sequence per micro-batch."""

    def __init__(self, message: str, *, estimate: MemoryEstimate, free_gib: float, suggestions: list[str]):
        super().__init__(message)
        self.estimate = estimate
        self.free_gib = free_gib
        self.suggestions = suggestions


@dataclass
class ResolvedTraining:
    """Every ``TrainSettings`` field decided, with the reason for each (``reasons[field]``)."""

    steps: int
    epochs: float
    learning_rate: float
    warmup_steps: int
    lr_scheduler: str
    micro_batch_size: int
    gradient_accumulation: int
    max_seq_length: int
    packing: bool
    gradient_checkpointing: bool
    weight_decay: float
    max_grad_norm: float
    seed: int
    checkpoint_every: int
    reasons: dict[str, str]
    memory: MemoryEstimate | None  # None when there was no memory figure to check against
    rows_per_epoch: int  # training rows per pass (packed rows when packing)
    truncated_examples: int  # examples longer than max_seq_length
    backend: str = "auto"  # train.backend, decided when the model loads (engine.training.backend)
    report_to: list[str] = field(default_factory=list)  # train.report_to (engine.jobs.reporting)
    compile: bool = False  # train.compile (engine.training.backend.compile_decoder_layers)
    cuda_graphs: bool = True  # train.cuda_graphs (engine.training.cuda_graphs)
    offload_activations: bool = False  # engine.training.offload

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = self.memory.to_dict() if self.memory else None
        return d


def _round_up(x: float, multiple: int) -> int:
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


def _default_learning_rate(shape: ModelShape, rank: int, device: str) -> tuple[float, str]:
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


MAX_DEFAULT_STEPS = 5000


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
    reasons: dict[str, str] = {}
    est_kwargs: dict[str, Any] = {
        # Batch sizes are fitted with recomputation on unless it was switched off: the lean choice;
        # whether to skip it is decided afterwards, at the chosen batch (below).
        "gradient_checkpointing": train.gradient_checkpointing is not False,
        "chunked_loss": chunked_loss,
        "lora_targets": lora_targets,
        "device": device,
        "bf16_supported": bf16_supported,
        "shards": shards,  # > 1: FSDP splits the base weights over that many cards
        # the native path's Liger kernels keep fewer activations (Unsloth's path does not take them)
        "liger_kernels": train.backend != "unsloth" and liger_kernels_apply(shape.model_type, device),
    }

    # --- sequence length: cover the data, not the model's whole context ---
    longest = max(token_lengths)
    if train.max_seq_length is not None:
        max_seq = train.max_seq_length
        reasons["max_seq_length"] = "given"
    else:
        p99 = percentile(token_lengths, 99)
        max_seq = max(MIN_SEQ_LENGTH, _round_up(p99, 64))
        reasons["max_seq_length"] = (
            f"99th percentile of example lengths is {p99:.0f} tokens (longest {longest}), rounded up to a multiple of 64"
        )
        if max_seq > shape.max_context:
            max_seq = shape.max_context
            reasons["max_seq_length"] += f", capped at the model's context of {shape.max_context}"
    truncated = sum(1 for n in token_lengths if n > max_seq)
    if truncated:
        reasons["max_seq_length"] += f"; {truncated} of {n_examples} examples are longer and will be cut"

    # --- packing ---
    if train.packing is not None:
        packing = train.packing
        reasons["packing"] = "given"
    else:
        # Padding-free packing wastes no compute on padding, on a GPU or a CPU alike.
        packing = True
        reasons["packing"] = "on: short examples share a row (padding-free, positions restart per example)"
    rows = _packed_rows(token_lengths, max_seq) if packing else n_examples

    # --- rows per optimizer step: ~16 examples, but at least ~4 steps per epoch ---
    mean_len = sum(min(n, max_seq) for n in token_lengths) / n_examples
    target = TARGET_EXAMPLES_PER_STEP
    if packing:
        target = max(1, round(TARGET_EXAMPLES_PER_STEP * mean_len / max_seq))
    # Why ~16 examples, not "as many tokens as the card holds": a step has a fixed cost (launches,
    # the optimizer), so bigger steps are faster per token on a GPU, but a small dataset then gets
    # few updates per epoch; 16 is where common LoRA recipes put the batch. Throughput is the
    # step's job (engine.training.fast_step), not the batch size's (issue 9, benchmarks/RESULTS.md).
    target_note = (
        f"about {TARGET_EXAMPLES_PER_STEP} examples per optimizer step: enough updates per epoch on small "
        "data; a larger step would be faster per token but update less often"
    )
    if target > max(1, rows // 4):
        target = max(1, rows // 4)
        target_note = f"{target} rows per step, so that each epoch of {rows} rows has at least 4 steps"

    # --- micro-batch from memory ---
    memory: MemoryEstimate | None = None
    fit = _FitCheck(shape, quantization, lora_rank, free_memory_gib or 0.0, context_in_use, est_kwargs)
    if train.micro_batch_size is not None:
        micro = train.micro_batch_size
        reasons["micro_batch_size"] = "given"
        if free_memory_gib is not None:
            memory = fit.estimate(micro, max_seq)
            if not fits(memory, free_memory_gib, context_in_use):
                raise fit.does_not_fit(micro, max_seq, memory, user_micro=True)
    else:
        limit = (
            target
            if train.gradient_accumulation is None
            else max(1, math.ceil(target / train.gradient_accumulation))
        )
        if free_memory_gib is not None:
            micro = fit.largest_micro_batch(max_seq, limit=max(1, limit))
            if micro == 0:
                raise fit.does_not_fit(1, max_seq, fit.estimate(1, max_seq))
            memory = fit.estimate(micro, max_seq)
            reasons["micro_batch_size"] = (
                f"largest power of two up to {limit} whose estimated peak ({memory.total_gib:.1f} GiB) fits in "
                f"{free_memory_gib:.1f} GiB free"
            )
        else:
            micro = min(limit, 4)
            reasons["micro_batch_size"] = (
                f"no free-memory figure on {device}: a small micro-batch of {micro}"
                + (" (CPU compute does not gain from larger ones)" if device == "cpu" else "")
            )

    # --- gradient accumulation: reach the target rows per step ---
    if train.gradient_accumulation is not None:
        accum = train.gradient_accumulation
        reasons["gradient_accumulation"] = "given"
    else:
        accum = max(1, round(target / micro))
        reasons["gradient_accumulation"] = (
            f"{micro} rows per micro-batch x {accum} = {micro * accum} rows per step ({target_note})"
        )
    per_step = micro * accum

    # --- steps / epochs ---
    steps_per_epoch = max(1, math.ceil(rows / per_step))
    if train.steps is not None:
        steps = train.steps
        epochs = steps * per_step / rows
        reasons["steps"] = "given"
        reasons["epochs"] = f"implied by {steps} steps of {per_step} rows over {rows} rows per epoch"
    else:
        if train.epochs is not None:
            epochs = train.epochs
            reasons["epochs"] = "given"
        else:
            epochs, reasons["epochs"] = _default_epochs(rows)
        steps = max(1, math.ceil(epochs * steps_per_epoch))
        reasons["steps"] = (
            f"{epochs:g} epochs x {steps_per_epoch} steps per epoch ({rows} rows, {per_step} per step)"
        )
        if steps > MAX_DEFAULT_STEPS and train.epochs is None:
            steps = MAX_DEFAULT_STEPS
            epochs = steps * per_step / rows
            reasons["steps"] += f", capped at {MAX_DEFAULT_STEPS} (set steps or epochs to train longer)"

    # --- learning rate and warm-up ---
    if train.learning_rate is not None:
        lr = train.learning_rate
        reasons["learning_rate"] = "given"
    else:
        lr, reasons["learning_rate"] = _default_learning_rate(shape, lora_rank, device)
    if train.warmup_steps is not None:
        warmup = train.warmup_steps
        reasons["warmup_steps"] = "given"
    else:
        warmup = round(0.04 * steps)
        if steps >= 10:
            warmup = max(1, warmup)
        reasons["warmup_steps"] = f"about 4% of {steps} steps"

    # --- checkpoints: about five per run, not more often than every 25 steps ---
    if train.checkpoint_every is not None:
        ckpt = train.checkpoint_every
        reasons["checkpoint_every"] = "given"
    else:
        ckpt = max(25, math.ceil(steps / 5))
        reasons["checkpoint_every"] = (
            f"about five checkpoints over {steps} steps, at least 25 steps apart"
            if steps > 25
            else f"a short run of {steps} steps: no intermediate checkpoint (one is written on cancel)"
        )

    recompute, reasons["gradient_checkpointing"], full = _decide_recompute(train, fit, memory, micro, max_seq)
    if full is not None:
        memory = full
    offload, reasons["offload_activations"] = _decide_offload(
        train, recompute, shape, micro * max_seq, device
    )
    if offload and memory is not None:
        memory = fit.estimate(micro, max_seq, offload_activations=True)

    for name in (
        "lr_scheduler",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "backend",
        "report_to",
        "compile",
        "cuda_graphs",
    ):
        value = getattr(train, name)
        default = TrainSettings.model_fields[name].get_default(call_default_factory=True)
        reasons[name] = "default" if value == default else "given"

    if memory is not None:
        reasons["micro_batch_size"] += f"; estimate {memory.summary()}"

    return ResolvedTraining(
        steps=steps,
        epochs=round(epochs, 4),
        learning_rate=lr,
        warmup_steps=warmup,
        lr_scheduler=train.lr_scheduler,
        micro_batch_size=micro,
        gradient_accumulation=accum,
        max_seq_length=max_seq,
        packing=packing,
        gradient_checkpointing=recompute,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        checkpoint_every=ckpt,
        reasons=reasons,
        memory=memory,
        rows_per_epoch=rows,
        truncated_examples=truncated,
        backend=train.backend,
        report_to=list(train.report_to),
        compile=train.compile,
        cuda_graphs=train.cuda_graphs,
        offload_activations=offload,
    )


# Recomputation is skipped only where keeping every layer's activations leaves this share of the free
# memory unused: the estimate is an estimate, and another program may take some of the card later.
NO_RECOMPUTE_SHARE = 0.75
# Checkpointed layer inputs are moved to host memory by default only where they add up to this much
# (below it the copies save little; engine.training.offload), and only for models this large: CUDA
# graphs cannot capture the copies, and below it graphs pay far more than the memory freed (a 0.5B step
# ran 1.3-4x faster with them; a 7B step, GPU-bound, the same with or without; RESULTS v7/v8).
OFFLOAD_MIN_GIB = 1.0
OFFLOAD_MIN_PARAMS = 3_000_000_000


def _decide_recompute(
    train: TrainSettings, fit: _FitCheck, memory: MemoryEstimate | None, micro: int, seq: int
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


def _decide_offload(
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
class _FitCheck:
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
