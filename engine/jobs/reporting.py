"""Training metrics for the tools people already watch: TensorBoard event files and Weights & Biases.

Off by default; ``train.report_to: ["tensorboard", "wandb"]`` turns them on. The reporters listen to
the job's own events (``EventWriter.listeners``), so the training loop needs no code for them: each
``Progress`` event of a training step (loss, learning rate, gradient norm, tokens/s, GPU memory, and a
method's own figures as ``train/rewards/chosen`` and the like) becomes one step of scalars, each ``Eval``
an ``eval/loss`` point (with ``eval/exact_match`` where rows have answers, ``eval/rewards/accuracies``
and the like for a preference method), on the job's global step (a series' runs lie end to end).

- TensorBoard: ``<job_dir>/tensorboard/`` (``tensorboard --logdir <job_dir>/tensorboard``).
- W&B: offline unless the user set ``WANDB_MODE`` (nothing leaves the machine by default); the run
  folder is ``<job_dir>/wandb/`` and ``wandb sync`` uploads it later. Project ``backprop-mcp``
  unless ``WANDB_PROJECT`` is set; the run is named after the job.

A reporter that fails (a full disk, a W&B hiccup) is dropped with one warning: metrics are a
convenience, never a reason to stop training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.contract.events import Eval, EventWriter, Progress

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"


def _scalars(p: Progress) -> dict[str, float]:
    out = {
        "train/loss": p.loss,
        "train/learning_rate": p.lr,
        "train/grad_norm": p.grad_norm,
        "train/tokens_per_s": p.tokens_per_s,
        "gpu/peak_memory_gib": p.gpu_memory_gib,
    }
    sample = p.gpu or {}
    if isinstance(sample.get("memory_used_mb"), (int, float)):
        out["gpu/memory_used_gib"] = sample["memory_used_mb"] / 1024
    if isinstance(sample.get("temperature_c"), (int, float)):
        out["gpu/temperature_c"] = sample["temperature_c"]
    # the method's own figures under trl's names, as trl's trainers report them: train/rewards/chosen, ...
    out.update({f"train/{name}": value for name, value in (p.metrics or {}).items()})
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float))}


class _TensorBoard:
    def __init__(self, job_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # optional extras: loaded only when asked for

        self.writer = SummaryWriter(log_dir=str(job_dir / TENSORBOARD_DIR))
        self.writer.add_text("job", f"`{job_dir.name}`: {config.get('kind')} of {config.get('model')}")

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # readers (tensorboard, tests) see each step as it happens

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, job_dir: Path, config: dict[str, Any]):
        import wandb  # optional extra, as above

        os.environ.setdefault("WANDB_MODE", "offline")  # the user's own setting wins
        os.environ.setdefault("WANDB_SILENT", "true")  # its console lines would land in worker.log
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "backprop-mcp"),
            name=job_dir.name,
            dir=str(job_dir),
            config=config,
            reinit="create_new",
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)  # W&B's own step axis is the job's global step

    def close(self) -> None:
        self.run.finish()


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Reporters:
    """The job's enabled reporters, fed from its events."""

    def __init__(self, names: list[str], job_dir: Path, config: dict[str, Any], events: EventWriter):
        self.events = events
        self.backends: dict[str, Any] = {}
        for name in dict.fromkeys(names):
            try:
                self.backends[name] = _BACKENDS[name](job_dir, config)
            except Exception as exc:  # noqa: BLE001 - a missing or broken logger must not stop training
                events.warning(
                    f"report_to {name}: could not start ({type(exc).__name__}: {exc}); not logging to it"
                )
        if self.backends:
            where = {"tensorboard": job_dir / TENSORBOARD_DIR, "wandb": job_dir / WANDB_DIR}
            events.log(
                "logging metrics to " + ", ".join(f"{n} ({where[n]})" for n in self.backends),
                report_to=list(self.backends),
            )

    def __call__(self, event: Any) -> None:
        if isinstance(event, Progress) and event.loss is not None:
            step = event.global_step if event.global_step is not None else event.step
            self._log(_scalars(event), step)
        elif isinstance(event, Eval):
            scalars = {"eval/loss": event.loss, **{f"eval/{k}": v for k, v in (event.metrics or {}).items()}}
            if event.accuracy is not None:
                scalars["eval/exact_match"] = event.accuracy
            self._log(scalars, event.global_step)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for name, backend in list(self.backends.items()):
            try:
                backend.log(scalars, step)
            except Exception as exc:  # noqa: BLE001
                self.backends.pop(name)
                self.events.warning(f"report_to {name}: logging failed ({exc}); no longer logging to it")

    def close(self) -> None:
        for backend in self.backends.values():
            try:
                backend.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort at the end of a job
                pass
        self.backends.clear()


@contextmanager
def reporting(spec: Any, job_dir: Path, events: EventWriter) -> Iterator[None]:
    """While the job runs, send its metrics to the reporters its ``train.report_to`` names (if any)."""
    names = list(getattr(getattr(spec, "train", None), "report_to", None) or [])
    if not names:
        yield
        return
    reporters = Reporters(names, job_dir, spec.model_dump(mode="json"), events)
    events.listeners.append(reporters)
    try:
        yield
    finally:
        events.listeners.remove(reporters)
        reporters.close()
