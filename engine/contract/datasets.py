"""What checking a dataset finds, in the words every surface shows: bad rows with their place, the report.

Shared by the data layer (which fills it), the planning checks, the worker and the server's tools.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MAX_PROBLEMS_KEPT = 1000  # a report keeps this many problems; the count covers all of them
PROBLEMS_IN_MESSAGE = 5
FORMAT_HELP = (
    "each row needs one of: messages (chat), conversations (ShareGPT), "
    "instruction+output (Alpaca), prompt+completion, text, or input_ids (pre-tokenized); "
    "for preference tuning: prompt+chosen+rejected, chosen+rejected (the shared start is the prompt), "
    "or prompt+completion+label (true/false, KTO); for GRPO: prompt alone (with any other columns)"
)


@dataclass
class RowProblem:
    file: str
    line: int
    message: str
    unit: Literal["line", "row"] = "line"  # what ``line`` counts (see the module docstring)

    def __str__(self) -> str:
        return f"{row_place(self.file, self.line, self.unit)}: {self.message}"


def row_place(file: str, position: int, unit: str) -> str:
    """``chat.jsonl:12`` for a line, ``data.json row 3`` for a row number."""
    return f"{file}:{position}" if unit == "line" else f"{file} row {position}"


@dataclass
class DatasetReport:
    path: str
    format: str  # one of FORMATS, "mixed", or "unknown" when no row could be read
    rows_total: int = 0
    rows_ok: int = 0
    skipped: int = 0  # bad rows left out by load_examples(skip_bad_rows=True)
    problems: list[RowProblem] = field(default_factory=list)  # the first MAX_PROBLEMS_KEPT
    bad_rows: int = 0  # every bad row, even past MAX_PROBLEMS_KEPT
    formats_found: dict[str, int] = field(default_factory=dict)  # rows per detected format
    kinds: dict[str, int] = field(default_factory=dict)  # good rows per Example.kind
    columns: dict[str, int] = field(default_factory=dict)  # prompt rows: good rows with each other column
    chars: dict[str, float] = field(default_factory=dict)  # min/mean/max characters of good rows
    source_type: str = ""  # jsonl, json, csv, parquet, saved_dataset, hub
    preview: dict[str, Any] | None = None  # the first good row as understood (long texts cut)

    def to_dict(self, max_problems: int = 20) -> dict[str, Any]:
        d = asdict(self)
        d["problems"] = [str(p) for p in self.problems[:max_problems]]
        return d

    def message(self, skip_option: str | None) -> str:
        """Why the dataset cannot be used as it is; ``skip_option`` is how the caller turns on skipping."""
        if self.rows_ok == 0:
            return (
                f"{self.path} has no usable rows ({self.rows_total} read, {self.bad_rows} bad). "
                + "".join(f"\n  {p}" for p in self.problems[:PROBLEMS_IN_MESSAGE])
                + "\n"
                + FORMAT_HELP
            )
        shown = "\n".join(f"  {p}" for p in self.problems[:PROBLEMS_IN_MESSAGE])
        more = self.bad_rows - min(len(self.problems), PROBLEMS_IN_MESSAGE)
        lines = [f"{self.path}: {self.bad_rows} of {self.rows_total} rows are bad:", shown]
        if more > 0:
            lines.append(f"  ... and {more} more")
        if self.format == "mixed":
            counts = ", ".join(f"{k} ({v} row{'s' if v != 1 else ''})" for k, v in self.formats_found.items())
            lines.append(f"The file mixes formats: {counts}. Put each format in a file of its own.")
        lines.append(
            f"Fix these rows, or set {skip_option} to train on the "
            f"{self.rows_ok} good rows and skip the rest (the skipped rows are reported)."
        )
        return "\n".join(lines)


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message says what is wrong and how to fix it."""

    def __init__(self, message: str, report: DatasetReport | None = None):
        super().__init__(message)
        self.report = report
