"""Showing a job's events to a person: a live progress bar (rich) or plain lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from engine.events import Event


class ProgressPrinter:
    """Turns events into a progress bar for training steps and one line for everything else."""

    def __init__(
        self, enabled: bool = True, stream: Any = None, translate: Callable[[str], str] = lambda s: s
    ):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.translate = translate  # the CLI names its flags where messages name API settings
        self._progress: Any = None
        self._task: Any = None

    def _bar(self, total: int) -> None:
        try:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:  # rich is optional: plain lines instead
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]progress"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total, detail="")
        else:
            self._progress.update(self._task, total=total)

    def _line(self, text: str) -> None:
        text = self.translate(text)
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        d = event.data
        if event.type == "progress":
            # training steps carry loss and tokens/s; export stages carry only step/total/item
            detail = (
                f"loss {d['loss']:.4f}  {d.get('tokens_per_s', 0):.0f} tok/s"
                if "loss" in d
                else str(d.get("item", ""))
            )
            self._bar(int(d.get("total", 0)))
            if self._progress is not None:
                self._progress.update(self._task, completed=d.get("step", 0), detail=detail)
            elif d.get("step") == d.get("total") or int(d.get("step", 0)) % 10 == 0:
                self._line(f"step {d.get('step')}/{d.get('total')}  {detail}")
        elif event.type in ("log", "warning", "stage", "queued", "checkpoint", "run_finished"):
            text = d.get("message") or d.get("name") or d.get("path") or ""
            prefix = {
                "warning": "warning: ",
                "stage": "== ",
                "queued": "queued: ",
                "checkpoint": "checkpoint: ",
            }.get(event.type, "")
            if event.type == "run_finished":
                text = run_finished_line(d)
            self._line(f"{prefix}{text}")
        elif event.type == "error":
            self._line(f"error: {d.get('type')}: {d.get('message')}\n  {d.get('hint', '')}")
        elif event.type == "finished":
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def run_finished_line(d: dict[str, Any]) -> str:
    """'run 2/3 finished: loss 2.31 -> 1.02 in 12.0 s; held-out loss on this slice 1.10 (accuracy 0.40)'."""
    m = d.get("metrics") or {}

    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, (int, float)) else "?"

    text = (
        f"run {d.get('run')}/{d.get('runs')} finished: loss {num(m.get('first_loss'))} -> "
        f"{num(m.get('final_loss'))} in {num(m.get('train_seconds'))} s; merged adapter's held-out loss "
        f"on this slice {num(m.get('heldout_loss'))}"
    )
    if m.get("heldout_accuracy") is not None:
        text += f" (exact match {num(m['heldout_accuracy'])})"
    return text
