"""One rank of a job on several devices: its place among the ranks, its model wrapped in DDP or
sharded by FSDP, and its share of each optimizer step.

The ranks are launched by engine.jobs.rank_launcher (``torchrun``); each runs the same recipe with its
own card and:

- takes every ``world``-th row of each optimizer step's rows, so the global batch is the one-rank
  batch; each micro-batch's loss is scaled by ``world / (the whole step's target tokens)``, so that
  DDP's mean over ranks gives exactly the one-rank gradient; only the last micro-batch syncs
  (``no_sync`` before it);
- all-reduces the step's loss sum and token count, so progress shows global figures;
- reads the cancel request on rank 0 and broadcasts it at every step (``agree``), so every rank
  stops at the same step, after rank 0's checkpoint.

On CPU (the tests) the ranks talk through gloo, on CUDA through NCCL. The one-device path never
comes here: ``active_rank()`` is None there and the loop runs exactly as before.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.training.batching import IGNORE
from engine.training.fast_step import loss_sum, prepare_batches
from engine.training.fused_lora import weights_updated
from engine.training.loss import causal_lm
from engine.training.step import StepInputs, StepResult
from engine.training.varlen_attention import VARLEN_FLAG, varlen_attention


@dataclass(frozen=True)
class RankContext:
    """This process's place in a multi-rank job."""

    rank: int
    world: int
    device: str
    sharded: bool = False  # FSDP: the frozen base weights sharded over the ranks (else DDP)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def check_plan(self, rows_per_step: int) -> None:
        if rows_per_step < self.world:
            raise ValueError(
                f"micro_batch_size x gradient_accumulation = {rows_per_step} rows per step, but the job "
                f"runs on {self.world} devices and each needs at least one row: raise gradient_accumulation "
                f"to {self.world} or more (the global batch is split across the devices)"
            )

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (a collective: every rank calls it at the same point)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def smallest(self, value: float) -> float:
        """The smallest of every rank's ``value`` (a collective): settings sized for the tightest card."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t.item())

    def wrap(self, model: Any) -> Any:
        """The model inside DDP (or sharded by FSDP), with rank 0's LoRA weights on every rank.

        DDP wraps a module whose forward is the step's loss (the loop never calls the model's own
        forward: the loss comes from hidden states in chunks). Only the trainable LoRA tensors are
        broadcast (``init_sync=False``: the frozen base weights come from the same files on every
        rank); every LoRA tensor is used in every forward, so ``find_unused_parameters`` stays off.

        FSDP (``sharded``, torch's FSDP2 ``fully_shard``, in place): each decoder layer and the
        decoder itself shard their frozen weights over the ranks (NF4 stored as the compute dtype,
        engine.training.base_model, so it can be sliced); a layer is gathered for its forward and
        backward. The LoRA tensors stay whole on every rank (``ignored_params``), so the optimizer,
        checkpoints and the saved adapter are the one-device ones; their gradients are averaged in
        ``run_share``, as DDP would. The output head stays whole too (it may be tied to the input
        embedding). Every call of the decoder is a collective: every rank evaluates.
        """
        lora = [p for p in model.parameters() if p.requires_grad]
        for p in lora:
            dist.broadcast(p.data, src=0)
        if self.sharded:
            # FSDP2's public names (torch >= 2.6): the one-device and DDP paths never need them
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import FSDPModule, fully_shard

            decoder = causal_lm(model).model
            if not isinstance(decoder, FSDPModule):  # a series' later runs train the same sharded model
                mesh = init_device_mesh(self.device.split(":")[0], (self.world,))
                for module in [*decoder.layers, decoder]:
                    fully_shard(module, mesh=mesh, ignored_params=set(lora))  # moves its shards to the card
                model.to(self.device)  # what FSDP leaves alone (LoRA, head), from host memory
            return _StepLoss(model)
        return torch.nn.parallel.DistributedDataParallel(
            _StepLoss(model), broadcast_buffers=False, init_sync=False, find_unused_parameters=False
        )

    def run_share(self, inputs: StepInputs) -> StepResult:
        """fast_step.run_step for this rank's share of the step (``inputs.model`` wrapped by ``wrap``);
        returns the same global figures on every rank."""
        ddp, optimizer, rows, data, micro = (
            inputs.model,
            inputs.optimizer,
            inputs.rows,
            inputs.data,
            inputs.micro,
        )
        device, dtype = inputs.device, inputs.autocast_dtype
        weights_updated()
        step_loss = getattr(ddp, "module", ddp)  # DDP's module, or the bare one under FSDP
        model = step_loss.model
        quiet = getattr(ddp, "no_sync", contextlib.nullcontext)
        varlen = bool(model.__dict__.get(VARLEN_FLAG, False))
        batches = prepare_batches(
            rows[self.rank :: self.world], data, micro, inputs.pad_id, device, varlen=varlen
        )
        mine = len(batches)
        real = sum(b.real_tokens for b in batches)
        if self.sharded:  # each forward gathers from every rank: all run as many micro-batches as rank 0
            batches += batches[:1] * (-(-len(rows[:: self.world]) // micro) - mine)  # weightless repeats
        # The whole step's target count, from the labels on the host (every rank has all the data):
        # scaled by it, DDP's mean of the ranks' gradients is the one-rank gradient.
        n_targets = sum(sum(1 for v in data.labels[i][1:] if v != IGNORE) for row in rows for i in row)
        scale = self.world / max(1, n_targets)
        dev_type = device.split(":")[0]
        total: torch.Tensor | None = None
        attention = varlen_attention(model) if varlen else contextlib.nullcontext()
        with attention:
            for i, b in enumerate(batches):
                last = i == len(batches) - 1  # gradients are all-reduced in the last backward only
                with contextlib.nullcontext() if last else quiet():
                    with torch.autocast(device_type=dev_type, dtype=dtype, enabled=dtype is not None):
                        part = ddp(b)
                    (part * (scale if i < mine else 0.0)).backward()
                if i < mine:
                    total = part.detach() if total is None else total + part.detach()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if self.sharded:  # the LoRA gradients, averaged over the ranks in one collective
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            for g, part in zip(grads, flat.div_(self.world).split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, inputs.max_grad_norm)  # same on every rank
        optimizer.step()
        weights_updated()
        optimizer.zero_grad(set_to_none=True)
        assert total is not None
        stats = torch.stack([total.float(), total.new_tensor(float(real), dtype=torch.float32)])
        dist.all_reduce(stats)  # the step's loss sum and tokens over every rank
        loss_total, tokens = stats.tolist()
        return StepResult(loss_total / max(1, n_targets), round(tokens), float(grad_norm))


class _StepLoss(torch.nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return loss_sum(self.model, batch)


_ACTIVE: RankContext | None = None


def active_rank() -> RankContext | None:
    """This process's rank when it is one of several, else None (the one-device path)."""
    return _ACTIVE


def set_active_rank(context: RankContext | None) -> None:
    """Make ``context`` this process's rank (engine.jobs.rank_launcher, once the process group is up).

    Process-wide on purpose: a rank is a whole process, and the blocks that behave differently on one
    (loading, the loop, the recipes' writers) read it here instead of threading it through every call.
    """
    global _ACTIVE
    _ACTIVE = context
