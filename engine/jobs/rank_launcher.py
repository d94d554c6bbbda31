"""A job on several devices, from the worker's side: launch its ranks through ``torchrun``, run one
rank, and turn the ranks' outcomes into the job's.

When a job's ``gpus`` names more than one device (engine.contract.spec), the worker keeps its device
locks and, instead of training itself, starts ``python -m torch.distributed.run --standalone
--nproc-per-node N -m engine rank <job_dir>`` and waits for it. Each rank runs the same recipe
(engine.jobs.dispatch) with its own card (``gpu_index`` = its entry of ``gpus``); how a rank trains is
engine.training.ranks. Rank 0 alone writes events, checkpoints, the adapter and the result (handed to
the waiting worker in ``ranks/rank-0.json``, which the worker writes as ``result.json``); the other
ranks write only their own ``ranks/rank-K.json`` (how they ended), so a crash in any rank reaches the
job's error event with that rank's message (torchrun stops the other ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.contract.errors import JobCancelled
from engine.contract.events import EventWriter
from engine.contract.files import atomic_write_text
from engine.contract.spec import CANCEL_FILE, EVENTS_FILE, ExportSpec, JobResult, read_spec
from engine.jobs.dispatch import error_hint, run_recipe
from engine.jobs.reporting import reporting
from engine.models.presets import model_shape, privacy_environment
from engine.planning.preflight import uses_fsdp

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
        from engine.hardware.gpus import probe_gpus  # looked up at call time (tests replace it)

        probe = probe_gpus()
        gpus = [g.index for g in probe.gpus] if spec.device != "cpu" and probe.available else []
    return sorted(gpus) if len(gpus) > 1 else []


class RankFailed(Exception):
    """A rank crashed; ``job_error`` is its error as the job's error event shows it."""

    def __init__(self, job_error: dict[str, str]):
        super().__init__(job_error["message"])
        self.job_error = job_error


def run_ranks(job_dir: Path, devices: list[int], events: Any) -> Any:
    """Run the job's ranks through torchrun and return rank 0's JobResult (or raise its failure)."""
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
    """FSDP or DDP for this job (engine.planning.preflight.uses_fsdp; on the CPU, 'auto' is DDP)."""
    from engine.hardware.gpus import probe_gpus  # looked up at call time (tests replace it)

    cards = [g for g in probe_gpus().gpus if g.index in devices] if device.startswith("cuda") else []
    auto = cards and spec.parallel == "auto"
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code) if auto else None
    return uses_fsdp(spec, cards, shape)


class _NoEvents:
    """The event writer of ranks other than 0: the job has one event log, rank 0's."""

    listeners: list[Any] = []

    def emit(self, event: Any) -> Any:
        return event

    def log(self, message: str, **details: Any) -> None: ...

    warning = log

    def stage(self, name: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


def run_rank(job_dir: str | Path) -> int:
    """Run this process's rank of the job (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK)."""
    # torch and the training blocks load here, not at the top: the worker imports this module to
    # launch the ranks and never trains itself
    import torch
    import torch.distributed as dist

    from engine.training.loading import pick_device
    from engine.training.ranks import RankContext, set_active_rank

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
        context = RankContext(rank=rank, world=world, device=device)
        # rank 0's choice on every rank (each reads the free memory at its own moment)
        context = replace(context, sharded=context.agree(_sharded(spec, devices, device)))
        set_active_rank(context)
        mode = "fsdp" if context.sharded else "ddp"
        events.log(f"{mode.upper()} over {world} ranks", parallel=mode)
        cancel_file = job_dir / CANCEL_FILE
        cancel_check = lambda: context.agree(rank == 0 and cancel_file.exists())  # noqa: E731
        with reporting(spec, job_dir, events) if rank == 0 else contextlib.nullcontext():
            result = run_recipe(spec, job_dir, events, cancel_check, own_process=True)
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
        error = {
            "type": type(exc).__name__,
            "message": str(exc) or type(exc).__name__,
            "hint": error_hint(exc),
        }
        atomic_write_text(outcome_path, json.dumps({"status": "failed", "time": time.time(), **error}))
        return 1
    finally:
        events.close()
        if dist.is_initialized():
            dist.destroy_process_group()
