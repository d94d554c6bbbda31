"""Smart defaults for a fine-tune, and the GPU memory estimate they rest on (torch-free).

``estimate_memory`` predicts the peak memory of one LoRA/QLoRA training step from the model's
shape alone; ``resolve_training`` fills every setting the user left out (``None`` in
``TrainSettings``) and says why, and refuses with :class:`DoesNotFitError` — numbers included —
when even one sequence per micro-batch cannot fit.

The memory model (per GPU, one training step, AdamW, LoRA weights in fp32 as peft keeps them):

- weights: NF4 stores 4 bits per weight of every decoder-layer linear, plus its block statistics
  (one 8-bit absmax per 64 weights and, with double quantisation, one fp32 per 256 blocks);
  embeddings, lm_head, norms and biases stay in the compute dtype. 16-bit: 2 bytes, fp32: 4.
- LoRA: r·(in+out) parameters per adapted linear; fp32 weight + gradient + two Adam moments.
- activations: with gradient checkpointing, each layer's input hidden state is kept
  (tokens × hidden per layer) and one layer at a time is recomputed during the backward pass, with
  its intermediates (attention and MLP projections, norms upcast to fp32) and their gradients;
  without it, every layer's intermediates are kept.
- logits and loss: an unfused loss materialises [tokens, vocab] logits — about 12 bytes per
  element at its peak (bf16 logits, their fp32 copy, log-softmax and its gradient); this is what
  dominates a 7B QLoRA step at 4×2048 tokens. A chunked loss (engine.training.loss) holds one chunk at a time.
- overhead: the CUDA context (~0.75 GiB, outside torch's allocator) and allocator slack (~10%).

``peak_allocated_gib`` is what ``torch.cuda.max_memory_allocated`` should report;
``total_gib`` is what must be free on the card (adds the overhead).
Attention is assumed to run through SDPA's flash / memory-efficient kernels (no tokens² matrix).

Checked on an H200 (torch 2.11, transformers 5.17, bitsandbytes 0.50.2, peft; Qwen2.5 architectures
with random weights, LoRA r=16 on all linears, bf16 autocast, AdamW, gradient checkpointing unless
noted, engine.training.loss's chunked loss unless noted). Peak allocated, measured vs estimated, GiB:
7B NF4 4x2048 unfused loss 21.30 vs 21.28; 7B NF4 4x2048 9.52 vs 9.83; 7B NF4 1x2048 6.93 vs 6.91;
7B NF4 8x4096 20.86 vs 21.65; 7B bf16 2x2048 17.02 vs 16.76; 7B NF4 2x2048 without checkpointing
29.19 vs 31.10; 0.5B NF4 8x1024 1.72 vs 1.65; 0.5B bf16 8x1024 2.22 vs 2.14 (all within 6%).
Memory in use on the card (context included) stayed at or below ``total_gib`` within 3%, except
0.5B NF4 (3.07 measured vs 3.0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from engine.spec import TrainSettings

GIB = 1024**3
StorageDtype = Literal["nf4", "bf16", "fp16", "fp32"]

# Calibration constants (bytes unless named otherwise); see the module docstring.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax + fp32 per 256 blocks
LOSS_BYTES_PER_LOGIT = 12.0  # peak bytes per [token, vocab] element of an unfused cross-entropy
LORA_BYTES_PER_PARAM = 16.0  # fp32 weight, gradient, Adam exp_avg and exp_avg_sq
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace outside torch's allocator (measured 0.75 on H200)
ALLOCATOR_SLACK = 0.10  # torch's reserved memory exceeds its peak allocation by ~2-11% ...
ALLOCATOR_SLACK_UNFUSED = 0.20  # ... and by ~19% when multi-GiB logits come and go
ALLOCATOR_SLACK_MIN_GIB = 0.6  # ... and by at least ~0.6 GiB for small models
CPU_RUNTIME_GIB = 0.75  # torch + transformers resident in RAM before any tensor
CHUNKED_LOSS_BYTES = 256 * 1024**2  # fp32 logits per chunk in engine.training.loss

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that memory and defaults depend on."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_context: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    model_type: str = "llama"
    params: int = 0  # 0: computed from the shape

    def __post_init__(self) -> None:
        if (
            min(self.hidden_size, self.num_layers, self.vocab_size, self.intermediate_size, self.num_heads)
            <= 0
        ):
            raise ValueError(f"a model shape needs positive sizes, got {self}")
        if self.head_dim <= 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.params <= 0:
            object.__setattr__(self, "params", self.computed_params())

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection of one decoder layer."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Weights of the linear projections of all decoder layers (what NF4 quantises)."""
        return self.num_layers * sum(a * b for a, b in self.linear_dims().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def computed_params(self) -> int:
        dims = self.linear_dims()
        biases = (dims["q_proj"][1] + 2 * dims["k_proj"][1]) if self.attention_bias else 0
        norms = 2 * self.hidden_size
        per_layer_other = biases + norms
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return (
            self.layer_linear_params
            + self.num_layers * per_layer_other
            + self.hidden_size
            + self.embedding_params
            + head
        )

    def lora_params(self, rank: int, targets: list[str] | str = "all-linear") -> int:
        """Trainable LoRA parameters: r·(in+out) for each adapted projection of each layer."""
        names = _lora_target_names(targets)
        dims = self.linear_dims()
        return self.num_layers * sum(rank * (dims[n][0] + dims[n][1]) for n in names)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _lora_target_names(targets: list[str] | str) -> list[str]:
    if targets == "all-linear" or isinstance(targets, str):
        return list(LINEAR_NAMES) if targets == "all-linear" else [n for n in LINEAR_NAMES if n == targets]
    known = [n for n in LINEAR_NAMES if n in targets]
    # Names this model family does not use (e.g. a fused "qkv_proj") can't be sized; assume all-linear.
    return known or list(LINEAR_NAMES)


def storage_dtype(quantization: str, device: str = "cuda", bf16_supported: bool = True) -> StorageDtype:
    """How base weights are stored for a spec's ``quantization`` on ``device``.

    auto: NF4 on a GPU, fp32 on CPU; 4bit: NF4; 16bit: bf16 (fp16 on GPUs without bf16); none: fp32.
    Already-resolved names (nf4, bf16, fp16, fp32) pass through.
    """
    q = quantization.lower()
    if q in ("nf4", "bf16", "fp16", "fp32"):
        return q  # type: ignore[return-value]
    if q == "auto":
        return "nf4" if device.startswith("cuda") else "fp32"
    if q == "4bit":
        return "nf4"
    if q == "16bit":
        return "bf16" if bf16_supported or not device.startswith("cuda") else "fp16"
    if q == "none":
        return "fp32"
    raise ValueError(f"unknown quantization {quantization!r}: use auto, 4bit, 16bit or none")


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of engine.training.loss's chunked cross-entropy (256 MiB of fp32 logits, at least 64)."""
    return max(64, CHUNKED_LOSS_BYTES // (4 * vocab_size))


@dataclass
class MemoryEstimate:
    weights_gib: float
    lora_gib: float  # LoRA weights + gradients + Adam states
    checkpointed_activations_gib: float  # layer inputs kept for the backward pass
    layer_activations_gib: float  # one layer's (or, without checkpointing, every layer's) intermediates
    logits_gib: float  # logits and loss working set
    cuda_context_gib: float
    allocator_slack_gib: float
    peak_allocated_gib: float  # comparable with torch.cuda.max_memory_allocated
    total_gib: float  # what must be free on the device
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def activations_gib(self) -> float:
        return self.checkpointed_activations_gib + self.layer_activations_gib

    def breakdown(self) -> dict[str, float]:
        return {
            "weights": self.weights_gib,
            "lora_params_grads_adam": self.lora_gib,
            "checkpointed_activations": self.checkpointed_activations_gib,
            "layer_activations": self.layer_activations_gib,
            "logits_and_loss": self.logits_gib,
            "cuda_context": self.cuda_context_gib,
            "allocator_slack": self.allocator_slack_gib,
            "total": self.total_gib,
        }

    def summary(self) -> str:
        parts = ", ".join(
            f"{k.replace('_', ' ')} {v:.2f}" for k, v in self.breakdown().items() if k != "total"
        )
        return f"{self.total_gib:.1f} GiB ({parts})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["activations_gib"] = self.activations_gib
        return d


def estimate_memory(
    shape: ModelShape,
    quantization: str,
    lora_rank: int,
    micro_batch: int,
    seq_len: int,
    *,
    gradient_checkpointing: bool = True,
    chunked_loss: bool = True,
    lora_targets: list[str] | str = "all-linear",
    device: str = "cuda",
    bf16_supported: bool = True,
) -> MemoryEstimate:
    """Peak memory of one training step (micro_batch sequences of seq_len tokens), in GiB.

    Packed and padded batches cost the same here: the estimate is for full rows of ``seq_len``
    tokens, the worst case of either.
    """
    if micro_batch < 1 or seq_len < 1 or lora_rank < 1:
        raise ValueError("micro_batch, seq_len and lora_rank must be at least 1")
    dtype = storage_dtype(quantization, device, bf16_supported)
    on_gpu = device.startswith("cuda")
    # Compute dtype of activations: 16-bit on a GPU (and for bf16 weights anywhere); NF4 on CPU
    # computes in fp32 (engine.models), fp32 weights compute in fp32.
    act = 2 if dtype in ("bf16", "fp16") or (dtype == "nf4" and on_gpu) else 4
    other_bytes = 4 if dtype == "fp32" or (dtype == "nf4" and not on_gpu) else 2

    non_linear = shape.params - shape.layer_linear_params
    if dtype == "nf4":
        weights = shape.layer_linear_params * NF4_BYTES_PER_WEIGHT + non_linear * other_bytes
    else:
        weights = shape.params * {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]

    lora = shape.lora_params(lora_rank, lora_targets) * LORA_BYTES_PER_PARAM

    tokens = micro_batch * seq_len
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    n_lora = len(_lora_target_names(lora_targets))
    # One layer's saved intermediates per token: norm in/out (x2), q, k, v, attention out,
    # gate, up, act(gate), act*up, LoRA's rank-sized products; RMSNorm's fp32 upcasts.
    saved_per_token = act * (4 * h + 2 * q_dim + 2 * kv_dim + 4 * i + n_lora * lora_rank) + 4 * 2 * h
    # Gradients alive while one layer's backward runs: about two MLP-sized and two hidden-sized tensors.
    grads_per_token = act * (2 * i + 2 * h)
    # NF4 dequantises one weight at a time into the compute dtype.
    dequant = max(a * b for a, b in shape.linear_dims().values()) * act if dtype == "nf4" else 0
    one_layer = tokens * (saved_per_token + grads_per_token) + dequant
    if gradient_checkpointing:
        checkpointed = shape.num_layers * tokens * h * act
        layer_acts = one_layer
    else:
        checkpointed = 0
        layer_acts = shape.num_layers * tokens * saved_per_token + tokens * grads_per_token + dequant

    loss_tokens = min(tokens, loss_chunk_tokens(shape.vocab_size)) if chunked_loss else tokens
    logits = loss_tokens * shape.vocab_size * LOSS_BYTES_PER_LOGIT + tokens * h * act

    # With checkpointing the loss peak (all layer inputs kept, logits alive) and the per-layer
    # backward peak come one after the other; without it, all activations are alive at the loss.
    transient = max(layer_acts, logits) if gradient_checkpointing else layer_acts + logits
    peak = weights + lora + checkpointed + transient
    if on_gpu:
        context = CUDA_CONTEXT_GIB * GIB
        slack = max(
            ALLOCATOR_SLACK_MIN_GIB * GIB,
            (ALLOCATOR_SLACK if chunked_loss else ALLOCATOR_SLACK_UNFUSED) * peak,
        )
    else:
        context, slack = CPU_RUNTIME_GIB * GIB, 0.0
    total = peak + context + slack

    def g(x: float) -> float:
        return round(x / GIB, 3)

    return MemoryEstimate(
        weights_gib=g(weights),
        lora_gib=g(lora),
        checkpointed_activations_gib=g(checkpointed),
        layer_activations_gib=g(layer_acts),
        logits_gib=g(logits),
        cuda_context_gib=g(context),
        allocator_slack_gib=g(slack),
        peak_allocated_gib=g(peak),
        total_gib=g(total),
        settings={
            "storage": dtype,
            "lora_rank": lora_rank,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
            "gradient_checkpointing": gradient_checkpointing,
            "chunked_loss": chunked_loss,
            "device": "cuda" if on_gpu else "cpu",
        },
    )


class DoesNotFitError(ValueError):
    """Training cannot fit in the free memory even at one sequence per micro-batch."""

    def __init__(self, message: str, *, estimate: MemoryEstimate, free_gib: float, suggestions: list[str]):
        super().__init__(message)
        self.estimate = estimate
        self.free_gib = free_gib
        self.suggestions = suggestions


# Leave a little of the free memory unused: other processes and the driver move it around.
FREE_MEMORY_USABLE = 0.95
MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64)
TARGET_EXAMPLES_PER_STEP = 16
MIN_SEQ_LENGTH = 64  # the shortest sequence length the defaults choose


def _fits(estimate: MemoryEstimate, free_gib: float, context_in_use: bool) -> bool:
    need = estimate.total_gib - (estimate.cuda_context_gib if context_in_use else 0.0)
    return need <= free_gib * FREE_MEMORY_USABLE


def largest_micro_batch(
    shape: ModelShape,
    quantization: str,
    lora_rank: int,
    seq_len: int,
    free_memory_gib: float,
    *,
    limit: int = 64,
    context_in_use: bool = False,
    **estimate_kwargs: Any,
) -> int:
    """The largest micro-batch (power of two, at most ``limit``) that fits; 0 if not even one does."""
    best = 0
    for mb in MICRO_BATCH_CHOICES:
        if mb > limit:
            break
        est = estimate_memory(shape, quantization, lora_rank, mb, seq_len, **estimate_kwargs)
        if not _fits(est, free_memory_gib, context_in_use):
            break
        best = mb
    return best


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

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation

    def to_train_settings(self) -> TrainSettings:
        return TrainSettings(**{name: getattr(self, name) for name in TrainSettings.model_fields})

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
        "gradient_checkpointing": train.gradient_checkpointing,
        "chunked_loss": chunked_loss,
        "lora_targets": lora_targets,
        "device": device,
        "bf16_supported": bf16_supported,
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
    target_note = f"about {TARGET_EXAMPLES_PER_STEP} examples per optimizer step"
    if target > max(1, rows // 4):
        target = max(1, rows // 4)
        target_note = f"{target} rows per step, so that each epoch of {rows} rows has at least 4 steps"

    # --- micro-batch from memory ---
    memory: MemoryEstimate | None = None
    if train.micro_batch_size is not None:
        micro = train.micro_batch_size
        reasons["micro_batch_size"] = "given"
        if free_memory_gib is not None:
            memory = estimate_memory(shape, quantization, lora_rank, micro, max_seq, **est_kwargs)
            if not _fits(memory, free_memory_gib, context_in_use):
                raise _does_not_fit(
                    shape, quantization, lora_rank, micro, max_seq, free_memory_gib, memory, est_kwargs,
                    context_in_use, user_micro=True,
                )  # fmt: skip
    else:
        limit = (
            target
            if train.gradient_accumulation is None
            else max(1, math.ceil(target / train.gradient_accumulation))
        )
        if free_memory_gib is not None:
            micro = largest_micro_batch(
                shape, quantization, lora_rank, max_seq, free_memory_gib,
                limit=max(1, limit), context_in_use=context_in_use, **est_kwargs,
            )  # fmt: skip
            if micro == 0:
                memory = estimate_memory(shape, quantization, lora_rank, 1, max_seq, **est_kwargs)
                raise _does_not_fit(
                    shape,
                    quantization,
                    lora_rank,
                    1,
                    max_seq,
                    free_memory_gib,
                    memory,
                    est_kwargs,
                    context_in_use,
                )
            memory = estimate_memory(shape, quantization, lora_rank, micro, max_seq, **est_kwargs)
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

    for name in ("lr_scheduler", "gradient_checkpointing", "weight_decay", "max_grad_norm", "seed"):
        value, default = getattr(train, name), TrainSettings.model_fields[name].default
        reasons[name] = "default" if value == default else "given"
    if not train.gradient_checkpointing:
        reasons["gradient_checkpointing"] = "given: off (faster, but keeps every layer's activations)"
    else:
        reasons["gradient_checkpointing"] += (
            ": on (recompute each layer in the backward pass, far less memory)"
        )

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
        gradient_checkpointing=train.gradient_checkpointing,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        checkpoint_every=ckpt,
        reasons=reasons,
        memory=memory,
        rows_per_epoch=rows,
        truncated_examples=truncated,
    )


def _does_not_fit(
    shape: ModelShape,
    quantization: str,
    rank: int,
    micro: int,
    seq: int,
    free_gib: float,
    estimate: MemoryEstimate,
    est_kwargs: dict[str, Any],
    context_in_use: bool,
    *,
    user_micro: bool = False,
) -> DoesNotFitError:
    """Build the error, with concrete changes that would fit (each checked against the estimate)."""
    suggestions: list[str] = []
    if user_micro and micro > 1:
        best = largest_micro_batch(
            shape,
            quantization,
            rank,
            seq,
            free_gib,
            limit=micro - 1,
            context_in_use=context_in_use,
            **est_kwargs,
        )
        if best:
            suggestions.append(f"micro_batch_size={best} (raise gradient_accumulation to keep the batch)")
    for s in range(seq - 64 - (seq % 64 or 0), 63, -64):
        if _fits(estimate_memory(shape, quantization, rank, 1, s, **est_kwargs), free_gib, context_in_use):
            suggestions.append(f"max_seq_length={s} (longer examples are cut)")
            break
    if storage_dtype(quantization, est_kwargs.get("device", "cuda")) != "nf4":
        alt = estimate_memory(shape, "4bit", rank, 1, seq, **est_kwargs)
        if _fits(alt, free_gib, context_in_use):
            suggestions.append(f'quantization="4bit" (QLoRA: about {alt.total_gib:.1f} GiB at micro-batch 1)')
    if not est_kwargs.get("gradient_checkpointing", True):
        suggestions.append("gradient_checkpointing=true")
    if rank > 8:
        suggestions.append(f"a lower LoRA rank (now {rank})")
    suggestions.append("a smaller model, or a GPU with more free memory (close other programs using it)")
    what = f"micro_batch_size={micro}" if user_micro else "even micro_batch_size=1"
    usable = free_gib * FREE_MEMORY_USABLE
    message = (
        f"training does not fit: {what} at max_seq_length={seq} needs about {estimate.total_gib:.1f} GiB "
        f"({estimate.summary()}) but {free_gib:.1f} GiB is free ({usable:.1f} GiB usable). Try: "
        + "; ".join(suggestions)
    )
    return DoesNotFitError(message, estimate=estimate, free_gib=free_gib, suggestions=suggestions)
