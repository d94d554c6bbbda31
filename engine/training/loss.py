"""Causal-LM loss without materialising the full logits tensor.

The plain way (``model(...).logits`` then cross-entropy) builds a [tokens, vocab] float32 tensor:
for micro-batch 4 × 2048 tokens and Qwen2.5's 152k vocabulary that is 5 GB, the largest single
item in a QLoRA step's memory. Here the loss is computed from the decoder's hidden states, only
at positions that carry a target (the assistant tokens of a chat set are often a small part),
in chunks whose logits exist one at a time.

When the output head is frozen (LoRA), ``LinearCrossEntropy`` computes each chunk's gradient with
respect to the hidden states in the forward pass, while its logits are at hand (softmax minus the
one-hot target), and keeps only that [tokens, hidden] gradient: the backward pass scales it. That is
two matmuls and one softmax per chunk instead of checkpointing's three matmuls (forward, recompute,
backward), two softmaxes and a softmax backward, with no host sync (CUDA graphs capture it). Where the head
is trained, each chunk is checkpointed: its logits are recomputed in the backward pass instead of kept.

On a GPU the per-chunk losses and logit gradient (``softmax_cross_entropy_grad``) run compiled by
torch.compile: one reduction and one pointwise kernel that read the 16-bit logits and write the 16-bit
gradient, where the eager ops make three fp32 passes (a fifth of a small model's step at micro-batch
16). It compiles once per process (a few seconds; ``compile_ahead`` does it on a thread while the job
tokenizes and loads its model); where compiling fails the eager ops take over with a warning. On the
CPU the eager ops run (in place: less memory).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.planning.memory import loss_chunk_tokens
from engine.training.accel import autocast_dtype
from engine.training.batching import IGNORE


def chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="sum")  # IGNORE is cross_entropy's ignore_index


def softmax_cross_entropy_grad(
    logits: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """For one chunk of ``logits`` [n, vocab] divided by ``temperature``: each row's cross-entropy against
    ``index`` [n, 1] where ``keep`` [n, 1] is 1 (0 elsewhere), [n] fp32, and its gradient w.r.t. the logits
    (softmax minus one-hot, over ``temperature``; zero in rows not kept) in the logits' dtype. Written as
    one row reduction and one pointwise expression so that torch.compile fuses it; the maths is
    ``cross_entropy_rows``' eager ops'. (A division by 1.0 is exact: one kernel serves every temperature.)"""
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    losses = ((lse - x.gather(1, index)) * keep).squeeze(1)
    onehot = torch.arange(x.shape[-1], device=x.device) == index
    grad = (torch.exp(x - lse) - onehot.float()) * keep / temperature
    return losses, grad.to(logits.dtype)


# "fn": the compiled softmax_cross_entropy_grad; "failed": why not; "ahead": compile_ahead's thread;
# "pool": compiled layers use inductor's worker pool (compile_workers)
_COMPILED: dict[str, Any] = {}


def compile_workers(pool: bool) -> None:
    """Whether torch's inductor compiles through its pool of worker processes (``pool``) or in this one.

    Its default starts the pool the first time anything compiles (with Triton installed): one worker a core,
    each importing torch, seconds of every core taken from the steps they overlap. The first compile does
    not wait for the pool, so the loss kernel's two kernels gain nothing from it, and the steps lose.
    Compiled decoder layers (train.compile: many kernels, recompiled as shapes change) ask for the pool.
    A user's TORCHINDUCTOR_COMPILE_THREADS is left as it is."""
    if pool:
        _COMPILED["pool"] = True  # the loss kernel, compiled after, keeps it too
    elif _COMPILED.get("pool"):
        return
    if "TORCHINDUCTOR_COMPILE_THREADS" in os.environ:
        return
    from torch._inductor import config

    config.compile_threads = config.decide_compile_threads() if pool else 1


def _compiled_softmax_grad() -> Any:
    if "failed" in _COMPILED:
        return None
    if "fn" not in _COMPILED:
        compile_workers(pool=False)
        _COMPILED["fn"] = torch.compile(softmax_cross_entropy_grad, dynamic=None)
    return _COMPILED["fn"]


def cross_entropy_rows(
    logits: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax_cross_entropy_grad`` (``keep`` boolean here), compiled on a GPU, the eager in-place ops
    elsewhere. Either way one chunk's working set is its logits and their gradient: the caller drops both
    before the next chunk's logits exist."""
    ahead = _COMPILED.get("ahead")
    if ahead is not None and ahead is not threading.current_thread():  # (it calls this too)
        ahead.join()  # its kernels run before the step's, and none while a CUDA graph is captured
        _COMPILED.pop("ahead", None)
    if logits.is_cuda and (fused := _compiled_softmax_grad()) is not None:
        try:
            return fused(logits, index, keep.to(torch.float32), temperature)
        except torch.OutOfMemoryError:  # the loop's back-off answers it; the kernel itself is fine
            raise
        except Exception as exc:  # no Triton, a compiler error: the eager ops compute the same
            _COMPILED["failed"] = repr(exc)
            warnings.warn(f"compiled loss kernel unavailable, using eager ops: {exc!r}", stacklevel=2)
    # Three passes over the [chunk, vocab] logits: log-softmax in fp32 (read in the dtype F.linear
    # gives under autocast, as chunk_loss), its exp in place, the cast for the matmul.
    if temperature == 1.0:
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    else:
        logp = torch.log_softmax(logits.float().div_(temperature), dim=-1)
    losses = -(logp.gather(1, index) * keep).squeeze(1)
    probs = logp.exp_().scatter_add_(1, index, torch.full_like(index, -1, dtype=logp.dtype)).mul_(keep)
    if temperature != 1.0:
        probs.div_(temperature)
    return losses, probs.to(logits.dtype)


def compile_ahead(device: str, vocab_size: int) -> threading.Thread | None:
    """Compile ``softmax_cross_entropy_grad`` on a thread for what a step's first calls bring (a full chunk
    of ``vocab_size`` logits in the autocast dtype, then a shorter last one: the shape-generic version),
    while the job tokenizes and loads its model; the step then finds it compiled instead of compiling it.
    None off a GPU. (The thread also waits for the CUDA context, which the caller must not.) Only for jobs
    whose first CUDA work after loading is a loss: ``cross_entropy_rows`` joins the thread, and no CUDA
    graph may be captured before (GRPO's sampler captures one first, so GRPO does not call this)."""
    if not device.startswith("cuda") or "failed" in _COMPILED or "fn" in _COMPILED:
        return None  # (compiled already in this process: a series' later runs)

    def compile_now() -> None:
        with contextlib.suppress(Exception):  # the step meets any error itself, where it has its message
            dtype = autocast_dtype(device) or torch.float32
            rows = loss_chunk_tokens(vocab_size)
            for n in (rows, rows // 2 + 1):
                logits = torch.zeros(n, vocab_size, dtype=dtype, device=device)
                index = torch.zeros(n, 1, dtype=torch.long, device=device)
                cross_entropy_rows(logits, index, torch.ones(n, 1, dtype=torch.bool, device=device))
            torch.cuda.synchronize(device)

    thread = _COMPILED["ahead"] = threading.Thread(
        target=compile_now, name="loss-kernel-compile", daemon=True
    )
    thread.start()
    return thread


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE adds nothing), in
    chunks of ``chunk`` rows; the gradient w.r.t. ``hidden`` is computed here, ``weight`` gets none."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        total = torch.zeros((), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            keep = (t != IGNORE).unsqueeze(1)
            index = t.clamp_min(0).unsqueeze(1)  # IGNORE rows point anywhere; their rows are masked out
            losses, grad_logits = cross_entropy_rows(F.linear(h, weight), index, keep)
            total += losses.sum()
            grad_hidden[start : start + chunk] = grad_logits.to(weight.dtype) @ weight  # 0 if ignored
            del grad_logits  # else it shares the next chunk's peak with that chunk's logits and gradient
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None, None


def token_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, fused: bool = True
) -> torch.Tensor:
    """Sum of the cross-entropies of ``hidden`` [n, h] through the output head ``weight`` [vocab, h]
    against ``targets`` [n] (IGNORE positions add nothing), one chunk of logits at a time.
    ``fused=False`` keeps checkpointed chunks even for a frozen head (the pre-fusion step, for benchmarks)."""
    chunk = loss_chunk_tokens(weight.shape[0])  # the memory estimate assumes the same chunks
    if fused and torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk):
        hc, tc = hidden[start : start + chunk], targets[start : start + chunk]
        if torch.is_grad_enabled():  # no RNG to preserve in a matmul and a cross-entropy
            total = total + checkpoint(
                chunk_loss, hc, weight, tc, use_reentrant=False, preserve_rng_state=False
            )
        else:
            total = total + chunk_loss(hc, weight, tc)
    return total


def chunked_lm_loss_sum(
    hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, *, fused: bool = True
) -> torch.Tensor:
    """Sum of token cross-entropies over positions whose target is not IGNORE."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    keep = t != IGNORE
    h, t = h[keep], t[keep]
    if t.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph connected for an all-masked micro-batch
    return token_loss_sum(h, lm_head_weight, t, fused=fused)


def causal_lm(model: Any) -> Any:
    """The transformers *ForCausalLM inside a peft wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def supports_hidden_state_loss(model: Any) -> bool:
    """True when logits are exactly lm_head(decoder(x)): no soft-capping or scaling to replicate, and a
    plain head (a LoRA on lm_head, from lora_target_modules, is not in its ``.weight``: the model's own
    head computes those logits)."""
    lm = causal_lm(model)
    cfg = lm.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    head = lm.get_output_embeddings()
    plain = head is not None and not hasattr(head, "base_layer") and getattr(head, "bias", None) is None
    return hasattr(lm, "model") and plain


def causal_lm_loss_sum(
    model: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    fused: bool = True,
) -> torch.Tensor:
    """Summed next-token loss for one micro-batch (targets already shifted, see engine.training.batching)."""
    if supports_hidden_state_loss(model):
        lm = causal_lm(model)
        out = lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        weight = lm.get_output_embeddings().weight
        return chunked_lm_loss_sum(out.last_hidden_state, weight, targets, fused=fused)
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
