"""``events.jsonl``: the worker's typed, append-only event log, and the reader that follows it.

One JSON object per line, one pydantic model per kind of event (below): the worker writes them
through ``EventWriter.emit`` and every reader (the server's tail, the CLI's progress bar, the
tests) gets the same models back from ``read_events`` — so a field that one side writes and the
other reads is declared once, here.

``seq`` counts from 1 and keeps counting when a resumed worker appends to the same file. The
writer emits each line with one ``write`` call and flushes it, so a reader only ever sees whole
lines plus, at worst, an unfinished last line, which it leaves for next time: a reader that
resumes from any offset it was given loses nothing and sees nothing twice.

A line that is valid JSON but no known event (a newer worker, a typo in an emitter) is skipped
with a log message; with ``BACKPROP_STRICT_EVENTS=1`` (the test suite sets it) it raises, so a
drift between writer and reader fails loudly in tests instead of silently losing data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

log = logging.getLogger(__name__)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = 0  # set by the writer
    time: float = 0.0  # set by the writer


class Queued(_Event):
    """Waiting for the device lock (another job holds the GPU)."""

    type: Literal["queued"] = "queued"
    message: str


class Started(_Event):
    """The worker holds its device and begins."""

    type: Literal["started"] = "started"
    kind: str
    pid: int
    device_lock: str | None = None


class Stage(_Event):
    """A named phase began: loading_data, tokenizing, loading_model, training, run, merge, ..."""

    type: Literal["stage"] = "stage"
    name: str
    message: str | None = None
    run: int | None = None
    runs: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Progress(_Event):
    """A step of work: an optimizer step when training (with loss), an item when exporting.

    In a series ``step``/``total`` count within run ``run`` of ``runs``; ``global_step`` counts
    across the whole job, so a loss curve has one continuous x axis.
    """

    type: Literal["progress"] = "progress"
    step: int
    total: int
    global_step: int | None = None
    run: int | None = None
    runs: int | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    step_s: float | None = None
    eta_s: float | None = None
    gpu_memory_gib: float | None = None
    gpu: dict[str, Any] | None = None
    stage: str | None = None  # export: which stage the items belong to
    item: str | None = None  # export: what was just done
    # The method's own figures, named as trl logs them (DPO: "rewards/chosen", "rewards/accuracies",
    # "rewards/margins", "logps/chosen", ...; GRPO: engine.contract.grpo_figures): a view plots every
    # series it finds without knowing the method.
    metrics: dict[str, float] | None = None


class Log(_Event):
    """A human-readable line, with structured details for programs."""

    type: Literal["log"] = "log"
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class WarningEvent(_Event):
    """Something the user should know: OOM back-off, skipped rows, paused for heat."""

    type: Literal["warning"] = "warning"
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class Checkpoint(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str
    run: int | None = None


class Eval(_Event):
    """A held-out evaluation at ``global_step`` (same axis as Progress.global_step)."""

    type: Literal["eval"] = "eval"
    global_step: int
    loss: float
    accuracy: float | None = None
    examples: int
    run: int | None = None
    metrics: dict[str, float] | None = None  # held-out figures of the method (e.g. "rewards/accuracies")


class RunFinished(_Event):
    """One run of a series ended; carries its row of the evaluation matrix."""

    type: Literal["run_finished"] = "run_finished"
    run: int
    runs: int
    loss_row: list[float | None]
    accuracy_row: list[float | None]
    metrics: dict[str, Any]
    series: dict[str, Any]
    merged_adapter: str
    finetuned_adapter: str


class ErrorEvent(_Event):
    """The job failed: the exception's type, what happened, and what to do."""

    type: Literal["error"] = "error"
    exception: str
    message: str
    hint: str | None = None


class Finished(_Event):
    type: Literal["finished"] = "finished"
    status: Literal["succeeded", "failed", "cancelled"]
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    resume_command: str | None = None


Event = Annotated[
    Union[Queued, Started, Stage, Progress, Log, WarningEvent, Checkpoint, Eval, RunFinished, ErrorEvent, Finished],
    Field(discriminator="type"),
]  # fmt: skip
_EVENT: TypeAdapter[Any] = TypeAdapter(Event)


class EventFormatError(ValueError):
    """A line of events.jsonl that is JSON but no known event (strict mode only)."""


def parse_event(raw: bytes | str) -> Event | None:
    """One line -> its event; None for a fragment left by a killed writer or (lenient) an unknown event."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None  # a torn line: the writer was killed mid-write
    try:
        return _EVENT.validate_python(obj)
    except ValidationError as exc:
        if os.environ.get("BACKPROP_STRICT_EVENTS") == "1":
            raise EventFormatError(f"unknown or malformed event {str(raw)[:200]!r}: {exc}") from exc
        log.warning("skipping an event this version does not know: %s", str(raw)[:200])
        return None


def _last_seq(path: Path) -> int:
    """The seq of the last complete line of an existing log (0 if none)."""
    last = 0
    if path.exists():
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
        self.listeners: list[Callable[[_Event], None]] = []  # called after each write (engine.jobs.reporting)

    def emit(self, event: _Event) -> _Event:
        self._seq += 1
        stamped = event.model_copy(update={"seq": self._seq, "time": time.time()})
        self._file.write(stamped.model_dump_json(exclude_none=True) + "\n")
        self._file.flush()
        if isinstance(stamped, (ErrorEvent, Finished)):
            os.fsync(self._file.fileno())
        for listener in self.listeners:
            listener(stamped)
        return stamped

    def catch_up(self) -> None:
        """Continue the count after another process appended (the ranks of a multi-device job)."""
        self._seq = _last_seq(self.path)

    def log(self, message: str, **details: Any) -> _Event:
        return self.emit(Log(message=message, details=details))

    def warning(self, message: str, **details: Any) -> _Event:
        return self.emit(WarningEvent(message=message, details=details))

    def stage(self, name: str, **fields: Any) -> _Event:
        known = {k: fields.pop(k) for k in ("message", "run", "runs") if k in fields}
        return self.emit(Stage(name=name, details=fields, **known))

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
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1  # only whole lines; an unfinished last line waits
    events = [e for raw in data[:end].splitlines() if raw.strip() and (e := parse_event(raw)) is not None]
    return events, offset + end


def iter_events(path: str | Path) -> Iterator[Event]:
    events, _ = read_events(path)
    yield from events
