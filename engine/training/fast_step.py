"""One optimizer step with no host sync inside it.

What the plain step paid for on every step and micro-batch, and what this one does instead:
- ``float(loss)`` per micro-batch and ``float(grad_norm)`` per step each stop the CPU until the GPU
  drains its queue: here losses add up on the GPU and one copy of [loss, grad norm] ends the step;
- boolean indexing of the target positions (``hidden[targets != IGNORE]``) needs the count on the
  host, a sync in the middle of the forward pass: here the positions are computed on the CPU while
  collating and the hidden states are gathered with ``index_select``;
- host-to-device copies of the batch are made from pinned memory without blocking;
- packed rows carry their example boundaries (``cu_seq_lens_q``) for the varlen attention kernel
  (engine.training.varlen_attention) when the model has it switched on; with CUDA graphs, see ``run_step``.

The maths is the plain step's: the loss is the sum of every target token's cross-entropy over the
whole step divided by the step's target count, computed in the same checkpointed chunks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from engine.training.batching import IGNORE, DeviceBatch, StaticShapes, collate
from engine.training.fused_lora import weights_updated
from engine.training.loss import causal_lm, supports_hidden_state_loss, token_loss_sum
from engine.training.step import StepInputs, StepResult
from engine.training.varlen_attention import VARLEN_FLAG, cu_seqlens_for_rows, varlen_attention

_NEXT_BATCHES = "_engine_next_batches"  # on a model: the next step's batches, collated ahead (run_step)


def _pinned(t: torch.Tensor, device: str) -> torch.Tensor:
    if device.startswith("cuda"):
        return t.pin_memory().to(device, non_blocking=True)
    return t


def prepare_batches(
    rows: list[list[int]],
    data: Any,
    micro: int,
    pad_id: int,
    device: str,
    *,
    varlen: bool,
    shapes: StaticShapes | None = None,
) -> list[DeviceBatch]:
    """Collate the step's rows into micro-batches, with everything the GPU needs computed on the CPU.

    With ``shapes`` every micro-batch is padded to one of its few fixed shapes (for CUDA graphs)."""
    out = []
    for i in range(0, len(rows), micro):
        chunk = rows[i : i + micro]
        longest_row = max(sum(len(data.input_ids[j]) for j in r) for r in chunk)
        width = shapes.width(longest_row) if shapes is not None else None
        b = collate(chunk, data.input_ids, data.labels, pad_id=pad_id, width=width)
        flat_t = b.targets.reshape(-1)
        index = (flat_t != IGNORE).nonzero().squeeze(1)  # on the CPU: no device sync
        targets = flat_t[index]
        n_targets = int(index.numel())
        if shapes is not None:
            extra = shapes.loss_positions(n_targets, flat_t.numel()) - n_targets
            index = torch.nn.functional.pad(index, (0, extra))  # position 0, with an IGNORE target
            targets = torch.nn.functional.pad(targets, (0, extra), value=IGNORE)
        kwargs: dict[str, Any] = {}
        # Rows of one example each (padding at the end) take causal SDPA, the faster kernel on Hopper
        # (cuDNN): only rows that hold several examples need the varlen kernel's boundaries.
        if varlen and any(len(r) > 1 for r in chunk):
            length = b.input_ids.shape[1]
            segments = []
            for r in chunk:
                sizes = [len(data.input_ids[j]) for j in r]
                segments.append(sizes + [length - sum(sizes)])
            cu, longest = cu_seqlens_for_rows(segments)
            if shapes is not None:  # zero-length pieces at the end; the row width bounds every piece
                cu = torch.cat([cu, cu[-1:].expand(shapes.boundaries(cu.numel(), len(chunk)) - cu.numel())])
                longest = length
            kwargs = {
                "cu_seq_lens_q": _pinned(cu, device),
                "cu_seq_lens_k": None,
                "max_length_q": longest,
                "max_length_k": longest,
            }
            kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_q"]
        out.append(
            DeviceBatch(
                input_ids=_pinned(b.input_ids, device),
                position_ids=_pinned(b.position_ids, device),
                gather_index=_pinned(index, device),
                gather_targets=_pinned(targets, device),
                n_targets=n_targets,
                real_tokens=b.real_tokens,
                attn_kwargs=kwargs,
            )
        )
    return out


def loss_sum(model: Any, b: DeviceBatch) -> torch.Tensor:
    """Summed next-token cross-entropy of one micro-batch, from hidden states in chunks (engine.training.loss)."""
    if not supports_hidden_state_loss(model):  # soft-capped or scaled logits: the model's own head
        logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **b.attn_kwargs)
        flat = logits.logits.reshape(-1, logits.logits.shape[-1]).index_select(0, b.gather_index)
        return torch.nn.functional.cross_entropy(flat.float(), b.gather_targets, reduction="sum")
    lm = causal_lm(model)
    out = lm.model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False, **b.attn_kwargs)
    hidden = out.last_hidden_state
    positions = b.gather_index.numel()  # n_targets, or more when padded to a fixed shape
    if positions == 0:
        return hidden.sum() * 0.0  # keeps the graph connected for an all-masked micro-batch
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, b.gather_index)
    return token_loss_sum(h, lm.get_output_embeddings().weight, b.gather_targets)


def run_step(inputs: StepInputs) -> StepResult:
    """Forward/backward over the step's micro-batches, one optimizer step, one host sync at the end.

    ``next_rows``: the next step's rows. They are collated, and their copies to the GPU queued, while
    the GPU still runs this step (before the sync that ends it); the next call picks them up. Without
    it the GPU would idle while the host collates each step (up to 8% of a small model's step).

    With ``graphs`` (engine.training.cuda_graphs) the micro-batches are padded to fixed shapes and
    replayed from CUDA graphs; the gradients then stay allocated between steps (zeroed in place),
    since the graphs accumulate into them where they were when captured.
    """
    model, optimizer, rows, data, micro = (
        inputs.model,
        inputs.optimizer,
        inputs.rows,
        inputs.data,
        inputs.micro,
    )
    device, graphs, dtype = inputs.device, inputs.graphs, inputs.autocast_dtype
    weights_updated()  # LoRA weights may have been written between steps (resume, merges)
    varlen = bool(model.__dict__.get(VARLEN_FLAG, False))
    shapes = graphs.shapes if graphs is not None else None

    def prepare(step_rows: list[list[int]]) -> list[DeviceBatch]:
        return prepare_batches(step_rows, data, micro, inputs.pad_id, device, varlen=varlen, shapes=shapes)

    def key(step_rows: list[list[int]]) -> tuple[Any, ...]:
        return (micro, varlen, tuple(map(tuple, step_rows)))

    ready = model.__dict__.pop(_NEXT_BATCHES, None)  # (data, shapes, key, batches): same objects only
    hit = ready is not None and ready[0] is data and ready[1] is shapes and ready[2] == key(rows)
    batches = ready[3] if hit else prepare(rows)
    n_targets = sum(b.n_targets for b in batches)
    dev_type = device.split(":")[0]
    # 1/targets as a tensor: a graph reads it where it was captured, so its value changes per step
    scale = graphs.scale if graphs is not None else torch.empty((), device=device)
    scale.fill_(1.0 / max(1, n_targets))

    def forward_backward(b: DeviceBatch) -> torch.Tensor:
        with torch.autocast(device_type=dev_type, dtype=dtype, enabled=dtype is not None):
            part = loss_sum(model, b)
        (part * scale).backward()
        return part.detach()

    total = torch.zeros((), device=device)
    attention = varlen_attention(model) if varlen else contextlib.nullcontext()
    stream = graphs.on_stream() if graphs is not None else contextlib.nullcontext()
    with attention, stream:  # forward and backward: checkpointed layers re-run attention in backward
        for b in batches:
            total += graphs.run(b, forward_backward) if graphs is not None else forward_backward(b)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, inputs.max_grad_norm)
    optimizer.step()
    weights_updated()  # the fused LoRA layers' cast copies are stale now
    optimizer.zero_grad(set_to_none=graphs is None)
    result = torch.stack([total, grad_norm.float()])
    if inputs.next_rows is not None:  # the host collates the next step while the GPU runs this one
        model.__dict__[_NEXT_BATCHES] = (data, shapes, key(inputs.next_rows), prepare(inputs.next_rows))
    loss_value, norm_value = result.tolist()  # the one sync
    return StepResult(loss_value / max(1, n_targets), sum(b.real_tokens for b in batches), norm_value)
