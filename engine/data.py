"""Datasets: read a file (or saved/hub dataset), detect its format, validate every row, normalise.

Torch-free on purpose: the MCP server imports this module to check a dataset before any job
starts. ``datasets``/``pyarrow`` load lazily, only for Parquet files, saved ``datasets`` folders
and hub names.

Sources
    ``.jsonl`` (one JSON object a line), ``.json`` (a list of rows, or an object holding the
    list under ``data``, ``rows`` or ``train``), ``.csv`` (a header row; ``messages`` and
    ``conversations`` cells may hold JSON text), ``.parquet``, a folder written by
    ``datasets.save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` plus ``split``), and anything
    else is taken as a Hugging Face Hub dataset name.

Row formats (one per file, detected from the rows)
    ``chat``        ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
    ``sharegpt``    ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
    ``alpaca``      ``{"instruction": str, "input": str (optional), "output": str}``
    ``prompt_completion``  ``{"prompt": str, "completion": str}``
    ``text``        ``{"text": str}``
    ``tokens``      ``{"input_ids": [int, ...], "labels": [int, ...] (optional, -100 = no loss)}``:
                    already tokenized for the model being trained (no template is applied)
    Other keys are ignored. Roles ``tool``/``function``/``ipython`` are refused: tool-calling
    conversations need tool-call structure that these formats do not carry, and silently
    dropping the turns would teach the model broken conversations.

Where a problem is reported
    JSONL: the 1-based line of the file; CSV: the 1-based line of the file (the header is line
    1); JSON lists, Parquet and ``datasets``: the 1-based row number (``RowProblem.unit`` says
    which). ``Example.source`` carries the same position, e.g. ``chat.jsonl:12``.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from engine.files import PathError, path_kind, quoted, user_path

if TYPE_CHECKING:
    from engine.spec import DatasetSettings

ExampleKind = Literal["chat", "completion", "text", "tokens"]
RowFormat = Literal["chat", "sharegpt", "alpaca", "prompt_completion", "text", "tokens"]
FORMATS: tuple[RowFormat, ...] = ("chat", "sharegpt", "alpaca", "prompt_completion", "text", "tokens")

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
JSON_LIST_KEYS = ("data", "rows", "train")
MAX_PROBLEMS_KEPT = 1000  # a report keeps this many problems; the count covers all of them
PROBLEMS_IN_MESSAGE = 5


@dataclass
class Example:
    """One normalised training row."""

    kind: ExampleKind
    messages: list[dict[str, str]] | None = None  # chat: role system|user|assistant, content str
    prompt: str | None = None  # completion
    completion: str | None = None  # completion
    text: str | None = None  # text
    input_ids: list[int] | None = None  # tokens
    labels: list[int] | None = None  # tokens (None: loss on every token)
    source: str = ""  # "file.jsonl:12", for error messages


@dataclass
class RowProblem:
    file: str
    line: int
    message: str
    unit: Literal["line", "row"] = "line"  # what ``line`` counts (see the module docstring)

    def __str__(self) -> str:
        return f"{_where(self.file, self.line, self.unit)}: {self.message}"


def _where(file: str, position: int, unit: str) -> str:
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
                + _format_help()
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

    def summary(self) -> str:
        """One line for logs and tool results."""
        text = f"{self.path}: {self.format} format, {self.rows_ok} of {self.rows_total} rows usable"
        if self.bad_rows:
            text += f", {self.bad_rows} bad" + (f" ({self.skipped} skipped)" if self.skipped else "")
        return text


class DatasetError(ValueError):
    """A dataset cannot be used as it is; the message says what is wrong and how to fix it."""

    def __init__(self, message: str, report: DatasetReport | None = None):
        super().__init__(message)
        self.report = report


class _BadRow(Exception):
    """Raised while normalising one row; becomes a RowProblem."""


@dataclass
class _RawRow:
    position: int  # line (JSONL/CSV) or 1-based row number
    value: Any = None
    error: str | None = None  # set when the row could not even be parsed


@dataclass
class _Source:
    label: str  # the file name shown in messages
    unit: Literal["line", "row"]
    source_type: str
    rows: Iterator[_RawRow]


# ---------------------------------------------------------------------------------------------
# Public API


def load_examples(settings: DatasetSettings) -> tuple[list[Example], DatasetReport]:
    """Load and normalise a dataset; refuse it if any row is bad, unless ``skip_bad_rows``."""
    examples, report = _read(settings.path, settings.split)
    if not examples:
        raise DatasetError(report.message(skip_option=None), report)
    if report.bad_rows and not settings.skip_bad_rows:
        raise DatasetError(report.message(skip_option="skip_bad_rows"), report)
    report.skipped = report.bad_rows
    return examples, report


def inspect_dataset(path: str, split: str | None = None) -> DatasetReport:
    """Check a dataset without refusing it: bad rows are listed in the report, not raised.

    Raises DatasetError only when the source itself cannot be read (missing, unreadable, or of
    an unknown type).
    """
    _, report = _read(path, split)
    return report


def split_for_eval(
    examples: list[Example], fraction: float, seed: int = 42
) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples (at least one when fraction > 0), reproducibly."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    train = [ex for i, ex in enumerate(examples) if i not in held]
    evaluation = [ex for i, ex in enumerate(examples) if i in held]
    return train, evaluation


# ---------------------------------------------------------------------------------------------
# Reading and validating


def _read(path: str, split: str | None) -> tuple[list[Example], DatasetReport]:
    source = _open_source(path, split)
    parsed: list[tuple[_RawRow, RowFormat | None, str | None]] = []
    for raw in source.rows:
        if raw.error is not None:
            parsed.append((raw, None, raw.error))
            continue
        fmt, why = _detect_row_format(raw.value)
        parsed.append((raw, fmt, why))

    formats_found: Counter[str] = Counter(fmt for _, fmt, _ in parsed if fmt is not None)
    # The file's format is the one most rows have; rows in another format are bad rows (one
    # file, one format), so a stray row is easy to find and the error names the mix.
    file_format = formats_found.most_common(1)[0][0] if formats_found else None
    shown = "unknown" if file_format is None else "mixed" if len(formats_found) > 1 else file_format
    report = DatasetReport(
        path=path, format=shown, formats_found=dict(formats_found), source_type=source.source_type
    )
    examples: list[Example] = []
    for raw, fmt, why in parsed:
        report.rows_total += 1
        where = _where(source.label, raw.position, source.unit)
        try:
            if why is not None:
                raise _BadRow(why)
            if fmt != file_format:
                raise _BadRow(
                    f"this row is in {fmt} format but most rows of the file are {file_format}; "
                    "one file must use one format (split it into one file per format)"
                )
            examples.append(_NORMALISERS[str(fmt)](raw.value, where))
        except _BadRow as bad:
            report.bad_rows += 1
            if len(report.problems) < MAX_PROBLEMS_KEPT:
                report.problems.append(RowProblem(source.label, raw.position, str(bad), source.unit))
    report.rows_ok = len(examples)
    report.kinds = dict(Counter(ex.kind for ex in examples))
    if examples:
        lengths = [_char_length(ex) for ex in examples]
        report.chars = {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
        report.preview = _preview(examples[0])
    return examples, report


def _preview(ex: Example, limit: int = 200) -> dict[str, Any]:
    def cut(text: str) -> str:
        return text if len(text) <= limit else text[:limit] + "..."

    out: dict[str, Any] = {"kind": ex.kind, "source": ex.source}
    if ex.messages is not None:
        out["messages"] = [{"role": m["role"], "content": cut(m["content"])} for m in ex.messages]
    for name in ("prompt", "completion", "text"):
        value = getattr(ex, name)
        if value is not None:
            out[name] = cut(value)
    return out


def _char_length(ex: Example) -> int:
    if ex.messages is not None:
        return sum(len(m["content"]) for m in ex.messages)
    if ex.input_ids is not None:
        return len(ex.input_ids)
    return len(ex.prompt or "") + len(ex.completion or "") + len(ex.text or "")


def _detect_row_format(row: Any) -> tuple[RowFormat | None, str | None]:
    """The format a row claims by its keys, or (None, why it has none)."""
    if not isinstance(row, dict):
        return None, f"expected an object with named fields, got {_type_name(row)}"
    present = {k for k, v in row.items() if v is not None}
    if "messages" in present:
        return "chat", None
    if "conversations" in present:
        return "sharegpt", None
    if present & {"prompt", "completion"}:
        return "prompt_completion", None
    if present & {"instruction", "output"}:
        return "alpaca", None
    if "text" in present:
        return "text", None
    if "input_ids" in present:
        return "tokens", None
    keys = ", ".join(sorted(str(k) for k in row)) or "none"
    if present & {"chosen", "rejected"}:
        hint = "preference data (chosen/rejected) is for DPO-style training, which is not supported"
    else:
        hint = _format_help()
    return None, f"no known field (found: {keys}); {hint}"


def _format_help() -> str:
    return (
        "each row needs one of: messages (chat), conversations (ShareGPT), "
        "instruction+output (Alpaca), prompt+completion, text, or input_ids (pre-tokenized)"
    )


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _text_field(row: dict[str, Any], key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _BadRow(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise _BadRow(f"field '{key}' is empty")
    return value


def _content_text(content: Any, what: str) -> str:
    """Message content: a string, or OpenAI-style text parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _BadRow(f"{what}: only text content is supported (found a '{part.get('type')}' part)")
            texts.append(part["text"])
        return "".join(texts)
    raise _BadRow(f"{what}: content must be a string, got {_type_name(content)}")


def _maybe_json_cell(value: Any, key: str) -> Any:
    # CSV cells are strings; a messages/conversations cell holds the list as JSON text.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadRow(f"field '{key}' is text but not a JSON list of messages ({e.msg})") from None
    return value


def _check_conversation(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if not messages:
        raise _BadRow(f"empty conversation: '{key}' has no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise _BadRow(f"{key}[{i}]: a system message is only allowed first")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise _BadRow("no assistant turn: there is nothing for the model to learn to answer")
    for i in assistants:
        if not messages[i]["content"].strip():
            raise _BadRow(f"{key}[{i}]: the assistant turn is empty")
    return messages


def _normalise_chat(row: dict[str, Any], where: str) -> Example:
    messages = _maybe_json_cell(row["messages"], "messages")
    if not isinstance(messages, list):
        raise _BadRow(f"field 'messages' must be a list of messages, got {_type_name(messages)}")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        what = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _BadRow(f"{what} must be an object with role and content, got {_type_name(m)}")
        role = m.get("role")
        if role is None:
            raise _BadRow(f"{what}: missing field 'role'")
        if not isinstance(role, str):
            raise _BadRow(f"{what}: role must be a string, got {_type_name(role)}")
        if role in TOOL_ROLES or (role == "assistant" and m.get("tool_calls")):
            raise _BadRow(
                f"{what}: tool-calling turns (role '{role}') are not supported; remove the tool turns or the row"
            )
        if role not in ROLES:
            hint = ""
            if role in SHAREGPT_ROLES:  # human/gpt: ShareGPT speakers written as chat roles
                hint = f"; did you mean '{SHAREGPT_ROLES[role]}'?"
            raise _BadRow(f"{what}: unknown role '{role}' (expected one of: {', '.join(ROLES)}){hint}")
        if "content" not in m or m["content"] is None:
            raise _BadRow(f"{what}: missing field 'content'")
        out.append({"role": role, "content": _content_text(m["content"], what)})
    return Example(kind="chat", messages=_check_conversation(out, "messages"), source=where)


def _normalise_sharegpt(row: dict[str, Any], where: str) -> Example:
    turns = _maybe_json_cell(row["conversations"], "conversations")
    if not isinstance(turns, list):
        raise _BadRow(f"field 'conversations' must be a list of turns, got {_type_name(turns)}")
    out: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        what = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise _BadRow(f"{what} must be an object with from and value, got {_type_name(t)}")
        # ShareGPT writes from/value; some exports use role/content inside conversations.
        speaker = t.get("from", t.get("role"))
        value = t.get("value", t.get("content"))
        if speaker is None:
            raise _BadRow(f"{what}: missing field 'from'")
        if not isinstance(speaker, str):
            raise _BadRow(f"{what}: 'from' must be a string, got {_type_name(speaker)}")
        if speaker in TOOL_ROLES:
            raise _BadRow(
                f"{what}: tool-calling turns ('{speaker}') are not supported; remove them or the row"
            )
        if speaker not in SHAREGPT_ROLES:
            raise _BadRow(f"{what}: unknown speaker '{speaker}' (expected one of: system, human, gpt)")
        if value is None:
            raise _BadRow(f"{what}: missing field 'value'")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": _content_text(value, what)})
    return Example(kind="chat", messages=_check_conversation(out, "conversations"), source=where)


def _normalise_alpaca(row: dict[str, Any], where: str) -> Example:
    instruction = _text_field(row, "instruction")
    extra = _text_field(row, "input", required=False, allow_empty=True)
    output = _text_field(row, "output")
    system = _text_field(row, "system", required=False, allow_empty=True)
    # Alpaca becomes a two-turn chat: instruction (and input, after a blank line) from the
    # user, output from the assistant; an optional `system` column becomes the system turn.
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return Example(kind="chat", messages=messages, source=where)


def _normalise_prompt_completion(row: dict[str, Any], where: str) -> Example:
    prompt = _text_field(row, "prompt")
    completion = _text_field(row, "completion")
    return Example(kind="completion", prompt=prompt, completion=completion, source=where)


def _normalise_text(row: dict[str, Any], where: str) -> Example:
    return Example(kind="text", text=_text_field(row, "text"), source=where)


def _token_list(row: dict[str, Any], key: str, *, allow_ignore: bool) -> list[int]:
    value = _maybe_json_cell(row.get(key), key)
    if not isinstance(value, list) or not value:
        raise _BadRow(f"field '{key}' must be a non-empty list of token ids, got {_type_name(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and not (allow_ignore and v == -100)):
            raise _BadRow(
                f"field '{key}' must hold non-negative integers{' or -100' if allow_ignore else ''}, found {v!r}"
            )
    return value


def _normalise_tokens(row: dict[str, Any], where: str) -> Example:
    ids = _token_list(row, "input_ids", allow_ignore=False)
    labels = _token_list(row, "labels", allow_ignore=True) if row.get("labels") is not None else None
    if labels is not None and len(labels) != len(ids):
        raise _BadRow(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}; they must match")
    return Example(kind="tokens", input_ids=ids, labels=labels, source=where)


_NORMALISERS = {
    "chat": _normalise_chat,
    "sharegpt": _normalise_sharegpt,
    "alpaca": _normalise_alpaca,
    "prompt_completion": _normalise_prompt_completion,
    "text": _normalise_text,
    "tokens": _normalise_tokens,
}


# ---------------------------------------------------------------------------------------------
# Sources


def is_hub_dataset(path: str) -> bool:
    """A name the worker downloads from the hub, rather than a file or folder on this machine."""
    try:
        exists = path_kind(user_path(path, "dataset"), "dataset") is not None
    except PathError:  # something is there but unusable (a FIFO, a name too long): not a hub name
        exists = True
    return not exists and not _looks_like_local_path(path)


def _looks_like_local_path(path: str) -> bool:
    return (
        path.startswith((".", "/", "~", "\\"))
        or Path(path).suffix.lower() in FILE_SUFFIXES + (".txt", ".tsv", ".arrow")
        or (len(path) > 1 and path[1] == ":")  # a Windows drive
        or path.count("/") > 1
    )


def _open_source(path: str, split: str | None) -> _Source:
    if not path or not path.strip():
        raise DatasetError("the dataset path is empty; give a JSONL/JSON/CSV/Parquet file or a folder")
    try:  # by type, before anything opens it: a FIFO or a device would block the read
        p = user_path(path, "dataset")
        kind = path_kind(p, "dataset")
    except PathError as exc:
        raise DatasetError(str(exc)) from None
    if kind == "dir":
        return _saved_dataset_source(p, split)
    if kind == "file":
        suffix = p.suffix.lower()
        readers = {
            ".jsonl": _jsonl_source,
            ".json": _json_source,
            ".csv": _csv_source,
            ".parquet": _parquet_source,
        }
        if suffix not in readers:
            raise DatasetError(
                f"{quoted(path)}: unknown file type {quoted(suffix or '(none)', 40)}; use .jsonl, .json, .csv or .parquet "
                "(for JSON Lines under another name, rename the file to .jsonl)"
            )
        try:
            return _json_source(p, split) if suffix == ".json" else readers[suffix](p)
        except OSError as e:
            raise DatasetError(f"{quoted(path)}: cannot read the file ({e.strerror or e})") from e
    if _looks_like_local_path(path):
        raise DatasetError(f"dataset file not found: {quoted(path)} (looked for {quoted(p.resolve())})")
    return _hub_source(path, split)


def _jsonl_source(p: Path) -> _Source:
    def rows() -> Iterator[_RawRow]:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                if not raw.strip():
                    continue  # blank lines (often a trailing one) are not rows
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _RawRow(n, error=f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
                    continue
                text = text.rstrip("\r\n")
                try:
                    yield _RawRow(n, json.loads(text))
                except json.JSONDecodeError as e:
                    yield _RawRow(n, error=f"not valid JSON ({e.msg} at column {e.pos + 1})")

    p.open("rb").close()  # fail now (DatasetError) rather than midway when unreadable
    return _Source(p.name, "line", "jsonl", rows())


def _json_source(p: Path, split: str | None = None) -> _Source:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not UTF-8 text; save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg.startswith("Extra data"):
            hint = " It looks like JSON Lines (one object per line): rename it to .jsonl."
        raise DatasetError(f"{p.name}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}).{hint}") from e
    label = p.name
    if isinstance(data, dict):
        # {"train": [...], "test": [...]}: the split names the list; otherwise a known key does.
        keys = [split] if split is not None else list(JSON_LIST_KEYS)
        key = next((k for k in keys if isinstance(data.get(k), list)), None)
        if key is None:
            found = ", ".join(sorted(data)) or "none"
            wanted = f"'{split}' (the split asked for)" if split is not None else ", ".join(JSON_LIST_KEYS)
            raise DatasetError(
                f"{p}: expected a list of rows, or an object with the list under {wanted}; "
                f"found an object with keys: {found}"
            )
        data = data[key]
        if split is not None:
            label = f"{p.name}[{split}]"
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a list of rows, got {_type_name(data)}")
    return _Source(label, "row", "json", _rows_of(data))


def _csv_source(p: Path) -> _Source:
    def rows() -> Iterator[_RawRow]:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield _RawRow(1, error=f"cannot read the header row ({e})")
                return
            start = reader.line_num + 1
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError:
                    yield _RawRow(start, error="not UTF-8 text; save the file as UTF-8")
                    return
                except csv.Error as e:
                    yield _RawRow(start, error=f"not valid CSV ({e})")
                    return
                line, start = start, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield _RawRow(line, error=f"has {len(cells)} cells but the header has {len(header)}")
                    continue
                # An empty cell is a missing value (a CSV cannot tell "" from absent).
                yield _RawRow(line, {h: (c if c != "" else None) for h, c in zip(header, cells, strict=True)})

    p.open("rb").close()
    return _Source(p.name, "line", "csv", rows())


def _parquet_source(p: Path) -> _Source:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with the train extra
        raise DatasetError("reading Parquet needs pyarrow: pip install 'backprop-mcp[train]'") from e
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{p}: cannot read the Parquet file ({e})") from e
    return _Source(p.name, "row", "parquet", _rows_of(table.to_pylist()))


def _rows_of(records: Any) -> Iterator[_RawRow]:
    for i, r in enumerate(records, start=1):
        yield _RawRow(i, r)


def _saved_dataset_source(p: Path, split: str | None) -> _Source:
    if (
        not (p / "dataset_dict.json").is_file()
        and not (p / "dataset_info.json").is_file()
        and not (p / "state.json").is_file()
    ):
        raise DatasetError(
            f"{p} is a folder but not one saved with datasets' save_to_disk (no dataset_dict.json or "
            "state.json); give the path of a .jsonl/.json/.csv/.parquet file instead"
        )
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DatasetError(
            "reading a saved dataset needs `datasets`: pip install 'backprop-mcp[train]'"
        ) from e
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DatasetError(f"{p}: cannot load the saved dataset ({e})") from e
    label = p.name
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _choose_split(list(loaded.keys()), split, str(p))
        loaded = loaded[chosen]
        label = f"{p.name}[{chosen}]"
    return _Source(label, "row", "saved_dataset", _rows_of(iter(loaded)))


def _choose_split(names: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in names:
            raise DatasetError(f"{where} has no split '{split}'; its splits are: {', '.join(names)}")
        return split
    if len(names) == 1:
        return names[0]
    if "train" in names:
        return "train"
    raise DatasetError(f"{where} has several splits ({', '.join(names)}); say which one with split")


def _hub_source(name: str, split: str | None) -> _Source:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DatasetError(
            f"'{name}' is not a local file or folder, and loading hub datasets needs `datasets`: "
            "pip install 'backprop-mcp[train]'"
        ) from e
    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DatasetError(_hub_error_message(name, e)) from e
    label = name
    if isinstance(loaded, datasets.DatasetDict):
        chosen = _choose_split(list(loaded.keys()), split, name)
        loaded = loaded[chosen]
        label = f"{name}[{chosen}]"
    elif split:
        label = f"{name}[{split}]"
    return _Source(label, "row", "hub", _rows_of(iter(loaded)))


def _hub_error_message(name: str, error: Exception) -> str:
    import os

    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    text = f"{type(error).__name__}: {error}"
    network_words = ("offline", "connect", "resolve", "network", "timed out", "unreachable", "couldn't reach")
    unreachable = offline or any(w in text.lower() for w in network_words)
    lines = [f"{quoted(name)} is not a local file or folder (no such path: {quoted(Path(name).resolve())})."]
    if unreachable:
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face Hub is unreachable"
        lines.append(
            f"Taken as a Hugging Face Hub dataset it cannot be loaded: {why}. Give the path of a local "
            ".jsonl/.json/.csv/.parquet file, or download the dataset on a machine with internet access "
            "(datasets' save_to_disk) and pass that folder."
        )
    else:
        lines.append(
            f"Loading it as a Hugging Face Hub dataset failed ({text}). Check the name (and split), "
            "or give the path of a local file."
        )
    return " ".join(lines)
