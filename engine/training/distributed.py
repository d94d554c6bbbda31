"""Several devices for one job: DDP ranks launched through ``torchrun`` (torch.distributed.run).

When a job's ``gpus`` names more than one device (engine.spec), the worker keeps its device locks
and, instead of training itself, starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m engine rank <job_dir>`` and waits for it. Each rank runs the same recipe
(worker._dispatch) with its own card (``gpu_index`` = its entry of ``gpus``) and:

- takes every ``world``-th row of each optimizer step's rows, so the global batch is the one-rank
  batch; each micro-batch's loss is scaled by ``world / (the whole step's target tokens)``, so that
  DDP's mean over ranks gives exactly the one-rank gradient; only the last micro-batch syncs
  (``no_sync`` before it);
- all-reduces the step's loss sum and token count, so progress shows global figures;
- rank 0 alone writes events, checkpoints, the adapter and the result (handed to the waiting worker
  in ``ranks/rank-0.json``, which the worker writes as ``result.json``); the other ranks write only
  their own ``ranks/rank-K.json`` (how they ended), so a crash in any rank reaches the job's error
  event with that rank's message (torchrun stops the other ranks);
- the cancel request is read by rank 0 and broadcast at every step, so every rank stops at the same
  step, after rank 0's checkpoint.

On CPU (the tests) the ranks talk through gloo, on CUDA through NCCL. The one-device path never
comes here: ``active_rank()`` is None there and the loop runs exactly as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.files import atomic_write_text
from engine.training.batching import IGNORE
from engine.training.fast_step import VARLEN_FLAG, loss_sum, prepare_batches
from engine.training.fused_lora import weights_updated
from engine.training.loss import causal_lm
from engine.training.varlen_attention import varlen_attention

RANKS_DIR = "ranks"  # ranks/rank-K.json: how rank K ended (and rank 0's result)


def job_devices(spec: Any) -> list[int]:
    """The devices a job trains on when it asks for several; [] means the one-device path.

    On a machine without a GPU (or with device 'cpu') a list of N entries means N CPU ranks, and
    'all' means the one CPU device.
    """
    gpus = getattr(spec, "gpus", None)
    if gpus is None:
        return []
    if gpus == "all":
        from engine.hardware import probe_gpus

        probe = probe_gpus()
        gpus = [g.index for g in probe.gpus] if spec.device != "cpu" and probe.available else []
    return sorted(gpus) if len(gpus) > 1 else []


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
        ``run_step``, as DDP would. The output head stays whole too (it may be tied to the input
        embedding). Every call of the decoder is a collective: every rank evaluates.
        """
        lora = [p for p in model.parameters() if p.requires_grad]
        for p in lora:
            dist.broadcast(p.data, src=0)
        if self.sharded:
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

    def run_step(
        self,
        ddp: Any,
        optimizer: Any,
        rows: list[list[int]],
        data: Any,
        micro: int,
        pad_id: int,
        device: str,
        autocast_dtype: torch.dtype | None,
        max_grad_norm: float,
    ) -> tuple[float, int, float]:
        """fast_step.run_step for one rank's share of the step; returns the same global figures."""
        weights_updated()
        step_loss = getattr(ddp, "module", ddp)  # DDP's module, or the bare one under FSDP
        model = step_loss.model
        quiet = getattr(ddp, "no_sync", contextlib.nullcontext)
        varlen = bool(model.__dict__.get(VARLEN_FLAG, False))
        batches = prepare_batches(rows[self.rank :: self.world], data, micro, pad_id, device, varlen=varlen)
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
                    with torch.autocast(
                        device_type=dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None
                    ):
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
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # same on every rank
        optimizer.step()
        weights_updated()
        optimizer.zero_grad(set_to_none=True)
        assert total is not None
        stats = torch.stack([total.float(), total.new_tensor(float(real), dtype=torch.float32)])
        dist.all_reduce(stats)  # the step's loss sum and tokens over every rank
        loss_total, tokens = stats.tolist()
        return loss_total / max(1, n_targets), round(tokens), float(grad_norm)


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


# -- the worker's side: launch the ranks, wait, turn their outcome into the job's -----------------


class RankFailed(Exception):
    """A rank crashed; ``job_error`` is its error as the job's error event shows it."""

    def __init__(self, job_error: dict[str, str]):
        super().__init__(job_error["message"])
        self.job_error = job_error


def run_ranks(job_dir: Path, devices: list[int], events: Any) -> Any:
    """Run the job's ranks through torchrun and return rank 0's JobResult (or raise its failure)."""
    from engine.jobs import JobCancelled
    from engine.spec import JobResult

    outcomes_dir = job_dir / RANKS_DIR
    outcomes_dir.mkdir(exist_ok=True)
    for old in outcomes_dir.glob("rank-*.json"):  # a resumed job's previous attempt
        old.unlink()
    events.log(f"training on {len(devices)} devices {devices} (one rank each, through torchrun)")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(devices)}",
        "-m", "engine", "rank", str(job_dir),
    ]  # fmt: skip
    # PYTHONSAFEPATH is the ranks' `python -P`: the job folder (their cwd) never shadows our package.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    code = subprocess.run(command, cwd=job_dir, env=env, stdout=subprocess.DEVNULL).returncode
    events.catch_up()  # rank 0 appended to the same event log
    outcomes = {
        int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in outcomes_dir.glob("rank-*.json")
    }
    failed = sorted((o["time"], r, o) for r, o in outcomes.items() if o["status"] == "failed")
    if failed:  # the first rank to fail; the others died of its absence
        _, rank, o = failed[0]
        raise RankFailed({"type": o["type"], "message": f"rank {rank}: {o['message']}", "hint": o["hint"]})
    first = outcomes.get(0, {})
    if first.get("status") == "cancelled":
        raise JobCancelled(first["message"])
    if code != 0 or first.get("status") != "succeeded":
        silent = [r for r in range(len(devices)) if r not in outcomes]
        raise RuntimeError(
            f"torchrun exited with code {code}; rank(s) {silent} ended without an error of their own "
            "(killed, e.g. by the out-of-memory killer?): see worker.log in the job folder"
        )
    result = JobResult.model_validate(first["result"])
    result.metrics["devices"] = len(devices)
    peaks = [outcomes[r].get("peak_gpu_memory_gib") for r in sorted(outcomes)]
    if any(p is not None for p in peaks):
        result.metrics["peak_gpu_memory_gib_per_device"] = peaks
    return result


# -- one rank (``python -m engine rank <job_dir>``, started by torchrun) ---------------------------


def _sharded(spec: Any, devices: list[int], device: str) -> bool:
    """FSDP or DDP for this job (engine.preflight.uses_fsdp; on the CPU, 'auto' is DDP)."""
    from engine.hardware import probe_gpus
    from engine.models import model_shape
    from engine.preflight import uses_fsdp

    cards = [g for g in probe_gpus().gpus if g.index in devices] if device.startswith("cuda") else []
    auto = cards and spec.parallel == "auto"
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code) if auto else None
    return uses_fsdp(spec, cards, shape)


class _NoEvents:
    """The event writer of ranks other than 0: the job has one event log, rank 0's."""

    listeners: list[Any] = []

    def emit(self, event: Any) -> Any:
        return event

    def log(self, message: str, **details: Any) -> None:
        pass

    warning = log

    def stage(self, name: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run_rank(job_dir: str | Path) -> int:
    """Run this process's rank of the job (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    global _ACTIVE
    from engine.events import EventWriter
    from engine.jobs import JobCancelled
    from engine.models import privacy_environment
    from engine.reporting import reporting
    from engine.spec import CANCEL_FILE, EVENTS_FILE, ExportSpec, read_spec
    from engine.training.loading import pick_device
    from engine.worker import _dispatch, _hint

    job_dir = Path(job_dir).resolve()
    privacy_environment()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    outcome_path = job_dir / RANKS_DIR / f"rank-{rank}.json"
    events: Any = EventWriter(job_dir / EVENTS_FILE) if rank == 0 else _NoEvents()
    try:
        spec = read_spec(job_dir)
        if isinstance(spec, ExportSpec):
            raise ValueError("an export runs on one device; it has no ranks")
        devices = job_devices(spec)
        device = pick_device(spec.device, devices[local])
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        # the rank's own card, and the native path: 'auto' would take Unsloth, which has one GPU only
        train = spec.train.model_copy(update={"backend": "native"})
        spec = spec.model_copy(
            update={"gpu_index": devices[local] if device.startswith("cuda") else 0, "train": train}
        )
        # Rank 0 alone evaluates and checkpoints, and a hot card pauses its rank for up to
        # safety.max_pause_s, while the others wait in the next collective: allow for that.
        wait = timedelta(seconds=max(1800.0, 2 * spec.safety.max_pause_s))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=wait)
        _ACTIVE = RankContext(rank=rank, world=world, device=device)
        # rank 0's choice on every rank (each reads the free memory at its own moment)
        _ACTIVE = replace(_ACTIVE, sharded=_ACTIVE.agree(_sharded(spec, devices, device)))
        mode = "fsdp" if _ACTIVE.sharded else "ddp"
        events.log(f"{mode.upper()} over {world} ranks", parallel=mode)
        cancel_file = job_dir / CANCEL_FILE
        cancel_check = lambda: _ACTIVE.agree(rank == 0 and cancel_file.exists())  # noqa: E731
        with reporting(spec, job_dir, events) if rank == 0 else contextlib.nullcontext():
            result = _dispatch(spec, job_dir, events, cancel_check)
        outcome: dict[str, Any] = {"status": "succeeded"}
        if device.startswith("cuda"):  # each card's peak (rank 0's result has its own only)
            outcome["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 1024**3, 3)
        if rank == 0:
            result.metrics["parallel"] = mode
            outcome["result"] = result.model_dump(mode="json")
        atomic_write_text(outcome_path, json.dumps(outcome))
        dist.barrier()
        return 0
    except JobCancelled as exc:  # every rank stops at the same step; rank 0 has checkpointed
        atomic_write_text(outcome_path, json.dumps({"status": "cancelled", "message": str(exc)}))
        dist.barrier()
        return 0
    except BaseException as exc:  # noqa: BLE001 - the worker reports the first rank's failure
        print(f"[rank {rank}]", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        error = {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__, "hint": _hint(exc)}
        atomic_write_text(outcome_path, json.dumps({"status": "failed", "time": time.time(), **error}))
        return 1
    finally:
        events.close()
        if dist.is_initialized():
            dist.destroy_process_group()
