"""``events.jsonl``: the worker's append-only event log, and the reader the server tails it with.

One JSON object per line: ``{"seq": 7, "time": 1764300000.12, "type": "progress", "data": {...}}``.
``seq`` counts from 1 and keeps counting when a resumed worker appends to the same file. The
writer emits each line with one ``write`` call and flushes it, so a reader only ever sees whole
lines plus, at worst, an unfinished last line, which it leaves for next time: a reader that
resumes from any offset it was given loses nothing and sees nothing twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

EventType = Literal[
    "queued",  # waiting for the GPU lock
    "started",  # the worker holds its device and begins
    "stage",  # a named phase began (loading, tokenizing, merge, convert, quantize, verify, ...)
    "progress",  # a training step (step, total, loss, lr, grad_norm, tokens_per_s, eta_s, gpu...)
    "log",  # a human-readable line
    "warning",  # something the user should know (OOM back-off, skipped rows, paused for heat)
    "checkpoint",  # a resumable checkpoint was written
    "run_finished",  # one run of a series ended (carries its row of the evaluation matrix)
    "error",  # the job failed: exception type and an actionable message
    "finished",  # the job ended: status succeeded/failed/cancelled
]
TERMINAL_TYPES = frozenset({"finished"})


class Event(BaseModel):
    seq: int = Field(ge=1)
    time: float
    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)


def _last_seq(path: Path) -> int:
    """The seq of the last complete line of an existing log (0 if none)."""
    if not path.exists():
        return 0
    last = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                last = int(json.loads(raw)["seq"])
            except (ValueError, KeyError, TypeError):
                continue
    return last


class EventWriter:
    """Appends events for one job. Only the worker that owns the job writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seq = _last_seq(self.path)
        # A worker killed mid-write can leave a partial last line; terminate it so that the
        # next event starts on a line of its own (the reader skips the broken fragment).
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "ab") as g:
                        g.write(b"\n")
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the job
        self.listeners: list[Callable[[Event], None]] = []  # called after each write (engine.reporting)

    def emit(self, type: EventType, /, **data: Any) -> Event:
        self._seq += 1
        event = Event(seq=self._seq, time=time.time(), type=type, data=data)
        self._file.write(event.model_dump_json() + "\n")
        self._file.flush()
        if type in TERMINAL_TYPES or type == "error":
            os.fsync(self._file.fileno())
        for listener in self.listeners:
            listener(event)
        return event

    def log(self, message: str, **data: Any) -> Event:
        return self.emit("log", message=message, **data)

    def warning(self, message: str, **data: Any) -> Event:
        return self.emit("warning", message=message, **data)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[Event], int]:
    """Events from byte ``offset`` to the last complete line, and the offset to resume from."""
    path = Path(path)
    if not path.exists():
        return [], offset
    events: list[Event] = []
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # only whole lines; an unfinished last line waits
    for raw in data[:end].splitlines():
        if not raw.strip():
            continue
        try:
            events.append(Event.model_validate_json(raw))
        except ValueError:
            continue  # a fragment left by a killed writer
    return events, offset + end


def iter_events(path: str | Path) -> Iterator[Event]:
    events, _ = read_events(path)
    yield from events
