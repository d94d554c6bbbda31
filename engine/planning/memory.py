"""The GPU memory of one LoRA/QLoRA training step, from the model's shape alone (torch-free).

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
The constants are calibrated against measured peaks (the figures: CHANGELOG.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from engine.models.shape import ModelShape, lora_target_names

GIB = 1024**3
StorageDtype = Literal["nf4", "bf16", "fp16", "fp32"]

# Calibration constants (bytes unless named otherwise); see the module docstring.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax + fp32 per 256 blocks
LOSS_BYTES_PER_LOGIT = 12.0  # peak bytes per [token, vocab] element of an unfused cross-entropy
LORA_BYTES_PER_PARAM = 16.0  # fp32 weight, gradient, Adam exp_avg and exp_avg_sq
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS workspace outside torch's allocator
ALLOCATOR_SLACK = 0.10  # torch's reserved memory exceeds its peak allocation by ~2-11% ...
ALLOCATOR_SLACK_UNFUSED = 0.20  # ... and by ~19% when multi-GiB logits come and go
ALLOCATOR_SLACK_MIN_GIB = 0.6  # ... and by at least ~0.6 GiB for small models
CPU_RUNTIME_GIB = 0.75  # torch + transformers resident in RAM before any tensor
CHUNKED_LOSS_BYTES = 256 * 1024**2  # fp32 logits per chunk in engine.training.loss


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


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNKED_LOSS_BYTES) -> int:
    """Tokens per chunk of engine.training.loss's chunked cross-entropy (``chunk_bytes`` of fp32 logits, by
    default 256 MiB; at least 64)."""
    return max(64, chunk_bytes // (4 * vocab_size))


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


def _runtime_overheads(peak: float, on_gpu: bool, chunked_loss: bool) -> tuple[float, float]:
    """Bytes beyond the tensors at the peak: the CUDA context and the allocator's slack on a GPU (more
    slack for the unchunked loss's large blocks); the runtime's own share on the CPU."""
    if not on_gpu:
        return CPU_RUNTIME_GIB * GIB, 0.0
    share = ALLOCATOR_SLACK if chunked_loss else ALLOCATOR_SLACK_UNFUSED
    return CUDA_CONTEXT_GIB * GIB, max(ALLOCATOR_SLACK_MIN_GIB * GIB, share * peak)


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
    shards: int = 1,
    offload_activations: bool = False,
    liger_kernels: bool = False,
    loss_chunk_bytes: int = CHUNKED_LOSS_BYTES,
) -> MemoryEstimate:
    """Peak memory of one training step (micro_batch sequences of seq_len tokens), in GiB.

    Packed and padded batches cost the same here: the estimate is for full rows of ``seq_len``
    tokens, the worst case of either. ``shards`` > 1: the decoder layers' weights are sharded over
    that many cards (FSDP, engine.training.ranks); each card holds its share plus about two
    whole layers (the one computing and the one being gathered); embeddings, head and LoRA stay whole.
    ``offload_activations``: the checkpointed layer inputs wait in host memory (engine.training.offload);
    the card holds about two of them at a time (the one copying, the one in use).
    ``liger_kernels``: the run's norms and SwiGLU are Liger's kernels (``liger_kernels_apply``), which keep
    fewer activations; it changes the estimate without recomputation, where every layer keeps its own.
    ``loss_chunk_bytes``: the fp32 logits of one chunk through the output head (GRPO's log-probabilities
    take smaller chunks than the next-token loss: engine.planning.grpo.LOGPS_CHUNK_BYTES).
    """
    if micro_batch < 1 or seq_len < 1 or lora_rank < 1:
        raise ValueError("micro_batch, seq_len and lora_rank must be at least 1")
    dtype = storage_dtype(quantization, device, bf16_supported)
    on_gpu = device.startswith("cuda")
    # Compute dtype of activations: 16-bit on a GPU (and for bf16 weights anywhere); NF4 on CPU
    # computes in fp32 (engine.models.presets), fp32 weights compute in fp32.
    act = 2 if dtype in ("bf16", "fp16") or (dtype == "nf4" and on_gpu) else 4
    weights = _weight_bytes(shape, dtype, on_gpu, shards)
    lora = shape.lora_params(lora_rank, lora_targets) * LORA_BYTES_PER_PARAM
    tokens = micro_batch * seq_len
    checkpointed, layer_acts = _activation_bytes(
        shape, tokens, act, dtype, lora_rank, lora_targets, gradient_checkpointing, offload_activations,
        liger_kernels,
    )  # fmt: skip
    loss_tokens = (
        min(tokens, loss_chunk_tokens(shape.vocab_size, loss_chunk_bytes)) if chunked_loss else tokens
    )
    logits = loss_tokens * shape.vocab_size * LOSS_BYTES_PER_LOGIT + tokens * shape.hidden_size * act
    # With checkpointing the loss peak (all layer inputs kept, logits alive) and the per-layer
    # backward peak come one after the other; without it, all activations are alive at the loss.
    transient = max(layer_acts, logits) if gradient_checkpointing else layer_acts + logits
    peak = weights + lora + checkpointed + transient
    context, slack = _runtime_overheads(peak, on_gpu, chunked_loss)
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
            "offload_activations": offload_activations and gradient_checkpointing,
            "liger_kernels": liger_kernels,
            "chunked_loss": chunked_loss,
            "device": "cuda" if on_gpu else "cpu",
        },
    )


def _weight_bytes(shape: ModelShape, dtype: StorageDtype, on_gpu: bool, shards: int) -> float:
    """The base weights on one card: the decoder layers' linears in ``dtype`` (their share when sharded,
    plus about two whole layers), everything else in the compute dtype."""
    other_bytes = 4 if dtype == "fp32" or (dtype == "nf4" and not on_gpu) else 2
    non_linear = shape.params - shape.layer_linear_params
    per_weight = {"nf4": NF4_BYTES_PER_WEIGHT, "bf16": 2, "fp16": 2, "fp32": 4}[dtype]
    layer_weights = shape.layer_linear_params * per_weight
    if shards > 1:
        layer_weights = layer_weights / shards + min(2 / shape.num_layers, 1 - 1 / shards) * layer_weights
    return layer_weights + non_linear * (other_bytes if dtype == "nf4" else per_weight)


def _activation_bytes(
    shape: ModelShape,
    tokens: int,
    act: int,
    dtype: StorageDtype,
    lora_rank: int,
    lora_targets: list[str] | str,
    gradient_checkpointing: bool,
    offload_activations: bool,
    liger_kernels: bool,
) -> tuple[float, float]:
    """(checkpointed layer inputs, the intermediates and gradients alive in the backward pass)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    n_lora = len(lora_target_names(lora_targets))
    # One layer's saved intermediates per token: norm in/out (x2), q, k, v, attention out,
    # gate, up, act(gate), act*up, LoRA's rank-sized products; RMSNorm's fp32 upcasts.
    saved_per_token = act * (4 * h + 2 * q_dim + 2 * kv_dim + 4 * i + n_lora * lora_rank) + 4 * 2 * h
    # With Liger's kernels a layer keeps gate and up but not act(gate) (its SwiGLU recomputes it), and its
    # RMSNorm no fp32 copies: it matters without recomputation, where every layer keeps its own.
    kept_per_token = (
        act * (4 * h + 2 * q_dim + 2 * kv_dim + 3 * i + n_lora * lora_rank)
        if liger_kernels
        else saved_per_token
    )
    # Gradients alive while one layer's backward runs: about two MLP-sized and two hidden-sized tensors.
    grads_per_token = act * (2 * i + 2 * h)
    # NF4 dequantises one weight at a time into the compute dtype.
    dequant = max(a * b for a, b in shape.linear_dims().values()) * act if dtype == "nf4" else 0
    if gradient_checkpointing:
        kept_inputs = min(2, shape.num_layers) if offload_activations else shape.num_layers
        return kept_inputs * tokens * h * act, tokens * (saved_per_token + grads_per_token) + dequant
    return 0, shape.num_layers * tokens * kept_per_token + tokens * grads_per_token + dequant


# Liger's patch function for each model family whose RMSNorm, RoPE and SwiGLU it replaces (applied by
# engine.training.accel on a GPU where liger-kernel is installed; the memory estimate counts it).
LIGER_PATCHES = {
    "qwen2": "apply_liger_kernel_to_qwen2",
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def liger_kernels_apply(model_type: str, device: str) -> bool:
    """Whether a run of this model family on ``device`` gets Liger's kernels (checked without importing)."""
    return (
        device.startswith("cuda")
        and model_type in LIGER_PATCHES
        and importlib.util.find_spec("liger_kernel") is not None
    )


# Leave a little of the free memory unused: other processes and the driver move it around.
FREE_MEMORY_USABLE = 0.95
MICRO_BATCH_CHOICES = (1, 2, 4, 8, 16, 32, 64)


def fits(estimate: MemoryEstimate, free_gib: float, context_in_use: bool) -> bool:
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
        if not fits(est, free_memory_gib, context_in_use):
            break
        best = mb
    return best


def card_keywords(card: Any, shards: int = 1) -> dict[str, Any]:
    """The estimate's keywords for a GPU ``card`` (a GpuInfo) with the weights sharded over ``shards`` cards."""
    return {"device": "cuda", "bf16_supported": card.bf16_supported, "shards": shards}
