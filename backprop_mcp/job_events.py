"""Following one job's ``events.jsonl``: read only what is new, keep a summary of what matters.

The server never re-reads a whole log on every poll: each ``JobTail`` remembers its byte offset
(``engine.contract.events.read_events`` resumes from any offset without losing or repeating events) and
folds new events into a small summary — the latest progress, the loss curve, the last error —
plus a bounded window of recent events for the ``.../events`` resource.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.interface import events as ev
from engine.interface import read_events

RECENT_EVENTS = 200
MAX_LOSS_POINTS = 5000
MAX_SERIES = 32  # a user's reward file may name many functions: the first ones are followed
_LATEST: dict[type, str] = {
    ev.Queued: "queued",
    ev.Started: "started",
    ev.Stage: "stage",
    ev.Progress: "progress",
    ev.Checkpoint: "checkpoint",
    ev.ErrorEvent: "error",
    ev.Finished: "finished",
}


@dataclass
class JobTail:
    events_path: Path
    offset: int = 0
    last_seq: int = 0
    recent: deque[ev.Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    queued: ev.Queued | None = None
    started: ev.Started | None = None
    stage: ev.Stage | None = None
    progress: ev.Progress | None = None
    loss: list[tuple[float, float]] = field(default_factory=list)  # (global step, training loss)
    eval_loss: list[tuple[float, float]] = field(default_factory=list)  # (global step, held-out loss)
    # The method's own figures, named as trl logs them ("rewards/chosen", "reward", "rewards/<f>/mean",
    # "kl", ...): name -> (global step, value), from Progress.metrics and Eval.metrics.
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    eval_metrics: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    run_starts: list[float] = field(default_factory=list)  # global step where each run of a series began
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    last_log: str | None = None
    checkpoint: ev.Checkpoint | None = None
    runs_finished: list[ev.RunFinished] = field(default_factory=list)
    error: ev.ErrorEvent | None = None
    finished: ev.Finished | None = None

    def poll(self) -> list[ev.Event]:
        """Fold in events appended since the last poll; returns them (empty when nothing new)."""
        events, self.offset = read_events(self.events_path, self.offset)
        fresh = [e for e in events if e.seq > self.last_seq]
        for event in fresh:
            self._fold(event)
        return fresh

    def _fold(self, event: ev.Event) -> None:
        self.last_seq = event.seq
        self.recent.append(event)
        if isinstance(event, ev.Progress):
            self._fold_progress(event)
        elif isinstance(event, ev.Eval):
            if len(self.eval_loss) < MAX_LOSS_POINTS:
                self.eval_loss.append((float(event.global_step), event.loss))
            _add_points(self.eval_metrics, float(event.global_step), event.metrics)
        elif isinstance(event, ev.WarningEvent):
            self.warnings.append(event.message)
        elif isinstance(event, ev.Log):
            self.last_log = event.message
        elif isinstance(event, ev.RunFinished):
            self.runs_finished.append(event)
        elif isinstance(event, ev.Started):  # a new attempt (a resume): the last one's end is history
            self.finished = self.error = None
        if type(event) in _LATEST:  # the latest of its kind
            setattr(self, _LATEST[type(event)], event)

    def _fold_progress(self, event: ev.Progress) -> None:
        x = float(event.global_step if event.global_step is not None else event.step)
        if event.loss is not None and len(self.loss) < MAX_LOSS_POINTS:
            if event.run is not None and event.run > len(self.run_starts):
                self.run_starts.append(x - 1)
            self.loss.append((x, event.loss))
        _add_points(self.metrics, x, event.metrics)

    def error_message(self) -> str | None:
        if self.error is None:
            return None
        return describe_error(
            {"type": self.error.exception, "message": self.error.message, "hint": self.error.hint}
        )


def _add_points(
    series: dict[str, list[tuple[float, float]]], x: float, values: dict[str, float] | None
) -> None:
    """One point per finite value, per series name (bounded in names and in points)."""
    for name, value in (values or {}).items():
        points = series.get(name)
        if points is None:
            if len(series) >= MAX_SERIES:
                continue
            points = series[name] = []
        if len(points) < MAX_LOSS_POINTS and isinstance(value, int | float) and math.isfinite(value):
            points.append((x, float(value)))


def describe_error(error: dict[str, Any]) -> str:
    """'Type: message Hint' from a result's ``error`` dict."""
    message = str(error.get("message") or "")
    kind = error.get("type")
    text = f"{kind}: {message}" if kind and message else (message or str(kind or error))
    hint = error.get("hint")
    return f"{text} {hint}" if hint else text
