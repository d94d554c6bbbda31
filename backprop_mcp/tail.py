"""Following one job's ``events.jsonl``: read only what is new, keep a summary of what matters.

The server never re-reads a whole log on every poll: each ``JobTail`` remembers its byte offset
(``engine.events.read_events`` resumes from any offset without losing or repeating events) and
folds new events into a small summary — the latest progress, the loss curve, the last error —
plus a bounded window of recent events for the ``.../events`` resource.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.events import Event, read_events

RECENT_EVENTS = 200
MAX_LOSS_POINTS = 5000


@dataclass
class JobTail:
    events_path: Path
    offset: int = 0
    last_seq: int = 0
    recent: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    queued: dict[str, Any] | None = None
    started: dict[str, Any] | None = None
    stage: str | None = None
    progress: dict[str, Any] | None = None
    progress_events: int = 0
    loss: list[tuple[float, float]] = field(default_factory=list)
    eval_loss: list[tuple[float, float]] = field(default_factory=list)
    run_starts: list[tuple[int, int]] = field(default_factory=list)  # (run, its first index in loss)
    warnings: deque[str] = field(default_factory=lambda: deque(maxlen=10))
    last_log: str | None = None
    checkpoint: dict[str, Any] | None = None
    runs_finished: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None

    def poll(self) -> list[Event]:
        """Fold in events appended since the last poll; returns them (empty when nothing new)."""
        events, self.offset = read_events(self.events_path, self.offset)
        fresh = [e for e in events if e.seq > self.last_seq]
        for event in fresh:
            self._fold(event)
        return fresh

    def _fold(self, event: Event) -> None:
        self.last_seq = event.seq
        self.recent.append(event)
        data = event.data
        kind = event.type
        if kind == "queued":
            self.queued = data
        elif kind == "started":
            self.started = {**data, "time": event.time}
        elif kind == "stage":
            self.stage = str(data.get("name") or data.get("stage") or data.get("message") or "")
        elif kind == "progress":
            self.progress = {**data, "time": event.time}
            self.progress_events += 1
            if (
                "run" in data
                and "loss" in data
                and (not self.run_starts or self.run_starts[-1][0] != data["run"])
            ):
                self.run_starts.append((int(data["run"]), len(self.loss)))
            self._add_point(self.loss, data, "loss")
            self._add_point(self.eval_loss, data, "eval_loss")
        elif kind == "warning":
            self.warnings.append(str(data.get("message", data)))
        elif kind == "log":
            self.last_log = str(data.get("message", data))
            # the held-out evaluation after training carries no step: it belongs at the last one
            self._add_point(self.eval_loss, {"step": (self.progress or {}).get("step"), **data}, "eval_loss")
        elif kind == "checkpoint":
            self.checkpoint = data
        elif kind == "run_finished":
            self.runs_finished.append(data)
        elif kind == "error":
            self.error = data
        elif kind == "finished":
            self.finished = data

    @staticmethod
    def _add_point(points: list[tuple[float, float]], data: dict[str, Any], key: str) -> None:
        value, step = data.get(key), data.get("global_step", data.get("step"))
        if (
            isinstance(value, (int, float))
            and isinstance(step, (int, float))
            and len(points) < MAX_LOSS_POINTS
        ):
            points.append((float(step), float(value)))

    def error_message(self) -> str | None:
        if self.error is None:
            return None
        return describe_error(self.error)


def describe_error(error: dict[str, Any]) -> str:
    """'Type: message Hint' from an error event's data or a result's ``error`` dict."""
    message = str(error.get("message") or error.get("error") or "")
    kind = error.get("type") or error.get("error_type") or error.get("exception")
    text = f"{kind}: {message}" if kind and message else (message or str(kind or error))
    hint = error.get("hint")
    return f"{text} {hint}" if hint else text
