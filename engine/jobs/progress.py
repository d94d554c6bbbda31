"""Showing a job's events to a person: a live progress bar (rich) or plain lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from engine.contract import events as ev


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
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        except ImportError:  # rich is optional: plain lines instead
            return
        if self._progress is None:
            progress = Progress(
                TextColumn("[bold]progress"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                transient=False,
                console=Console(file=self.stream),  # stderr: stdout carries the result (pipes, --json)
            )
            # the bar and its task become visible together, before it starts: a Ctrl-C landing in
            # start() (the CLI then asks the job to stop and keeps printing) never leaves a bar
            # without its task
            self._progress, self._task = progress, progress.add_task("train", total=total, detail="")
            progress.start()
        else:
            self._progress.update(self._task, total=total)

    def _line(self, text: str) -> None:
        text = self.translate(text)
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: ev.Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, ev.Progress):
            # training steps carry loss and tokens/s; export stages carry only step/total/item
            if event.loss is not None:
                detail = f"loss {event.loss:.4f}  {event.tokens_per_s or 0:.0f} tok/s"
                if event.run and event.runs:
                    detail = f"run {event.run}/{event.runs}  {detail}"
            else:
                detail = event.item or ""
            self._bar(event.total)
            if self._progress is not None:
                self._progress.update(self._task, completed=event.step, detail=detail)
            elif event.step == event.total or event.step % 10 == 0:
                self._line(f"step {event.step}/{event.total}  {detail}")
        elif isinstance(event, ev.WarningEvent):
            self._line(f"warning: {event.message}")
        elif isinstance(event, (ev.Log, ev.Queued)):
            self._line(("queued: " if isinstance(event, ev.Queued) else "") + event.message)
        elif isinstance(event, ev.Stage):
            self._line(f"== {event.message or event.name}")
        elif isinstance(event, ev.Checkpoint):
            self._line(f"checkpoint: {event.path}")
        elif isinstance(event, ev.Eval):
            self._line(f"held-out loss {event.loss:.4f} at step {event.global_step}")
        elif isinstance(event, ev.RunFinished):
            self._line(f"run {event.run}/{event.runs} finished: held-out loss {event.loss_row[-1]}")
        elif isinstance(event, ev.ErrorEvent):
            self._line(f"error: {event.exception}: {event.message}\n  {event.hint or ''}")
        elif isinstance(event, ev.Finished):
            self.close()
            if event.resume_command:
                self._line(f"stopped; resume with: {event.resume_command}")

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._task = None
