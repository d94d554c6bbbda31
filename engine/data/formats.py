"""Datasets: read a file (or saved/hub dataset), detect its format, validate every row, normalise.

Torch-free on purpose: the MCP server imports this module to check a dataset before any job
starts. ``datasets``/``pyarrow`` load lazily, only for Parquet files, saved ``datasets`` folders
and hub names.

Sources
    Read by ``engine.data.sources``: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, a folder
    written by ``datasets.save_to_disk``, or a Hugging Face Hub dataset name.

Row formats (one per file, detected from the rows)
    ``chat``        ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
    ``sharegpt``    ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
    ``alpaca``      ``{"instruction": str, "input": str (optional), "output": str}``
    ``prompt_completion``  ``{"prompt": str, "completion": str}``
    ``text``        ``{"text": str}``
    ``tokens``      ``{"input_ids": [int, ...], "labels": [int, ...] (optional, -100 = no loss)}``:
                    already tokenized for the model being trained (no template is applied)
    ``preference``, ``preference_implicit``, ``unpaired_preference``: trl's preference formats
                    (``{"prompt", "chosen", "rejected"}``, ``{"chosen", "rejected"}``,
                    ``{"prompt", "completion", "label"}``), see ``engine.data.preference``
    ``prompt``      ``{"prompt": str | [messages], ...other columns}`` with no completion: prompts for
                    method 'grpo', the other columns passed to its rewards (``engine.data.prompts``)
    Other keys are ignored. Roles ``tool``/``function``/``ipython`` are refused: tool-calling
    conversations need tool-call structure that these formats do not carry, and silently
    dropping the turns would teach the model broken conversations.

Where a problem is reported
    JSONL: the 1-based line of the file; CSV: the 1-based line of the file (the header is line
    1); JSON lists, Parquet and ``datasets``: the 1-based row number (``RowProblem.unit`` says
    which). ``Example.source`` carries the same position, e.g. ``chat.jsonl:12``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from engine.contract.datasets import (
    FORMAT_HELP,
    MAX_PROBLEMS_KEPT,
    DatasetError,
    DatasetReport,
    RowProblem,
    row_place,
)
from engine.contract.spec import DatasetSettings
from engine.data.preference import Preference, normalise_paired, normalise_unpaired
from engine.data.prompts import normalise_prompt_row
from engine.data.rows import ROLES, TOOL_ROLES, RowError, content_text, json_cell, text_field
from engine.data.sources import RawRow, open_source, type_name

ExampleKind = Literal["chat", "completion", "text", "tokens", "preference", "unpaired", "prompt"]
RowFormat = Literal[
    "chat", "sharegpt", "alpaca", "prompt_completion", "text", "tokens",
    "preference", "preference_implicit", "unpaired_preference", "prompt",
]  # fmt: skip
FORMATS: tuple[RowFormat, ...] = RowFormat.__args__  # type: ignore[attr-defined]

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


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
    preference: Preference | None = None  # preference (a pair) and unpaired (one judged answer)
    columns: dict[str, Any] | None = None  # prompt: the row's other columns (GRPO's rewards read them)
    source: str = ""  # "file.jsonl:12", for error messages


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
    source = open_source(path, split)
    parsed: list[tuple[RawRow, RowFormat | None, str | None]] = []
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
        where = row_place(source.label, raw.position, source.unit)
        try:
            if why is not None:
                raise RowError(why)
            if fmt == "prompt" and file_format == "prompt_completion":  # not a prompt row: a pair cut short
                raise RowError("missing field 'completion' (the other rows are prompt/completion pairs)")
            if fmt != file_format:
                raise RowError(
                    f"this row is in {fmt} format but most rows of the file are {file_format}; "
                    "one file must use one format (split it into one file per format)"
                )
            examples.append(_NORMALISERS[str(fmt)](raw.value, where))
        except RowError as bad:
            report.bad_rows += 1
            if len(report.problems) < MAX_PROBLEMS_KEPT:
                report.problems.append(RowProblem(source.label, raw.position, str(bad), source.unit))
    report.rows_ok = len(examples)
    report.kinds = dict(Counter(ex.kind for ex in examples))
    report.columns = dict(
        Counter(k for ex in examples for k, v in (ex.columns or {}).items() if v is not None)
    )
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
    if ex.preference is not None:
        for name in ("prompt", "chosen", "rejected", "completion", "label"):
            value = getattr(ex.preference, name)
            if isinstance(value, str):
                out[name] = cut(value)
            elif isinstance(value, list):
                out[name] = [{"role": m["role"], "content": cut(m["content"])} for m in value]
            elif value is not None:
                out[name] = value
    if ex.columns:
        out["columns"] = {k: cut(str(v)) for k, v in list(ex.columns.items())[:10]}
    return out


def _char_length(ex: Example) -> int:
    if ex.messages is not None:
        return sum(len(m["content"]) for m in ex.messages)
    if ex.input_ids is not None:
        return len(ex.input_ids)
    if ex.preference is not None:
        p = ex.preference
        return sum(_text_chars(t) for t in (p.prompt, p.chosen, p.rejected, p.completion) if t is not None)
    return len(ex.prompt or "") + len(ex.completion or "") + len(ex.text or "")


def _text_chars(text: str | list[dict[str, str]]) -> int:
    return len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)


def _detect_row_format(row: Any) -> tuple[RowFormat | None, str | None]:
    """The format a row claims by its keys, or (None, why it has none)."""
    if not isinstance(row, dict):
        return None, f"expected an object with named fields, got {type_name(row)}"
    present = {k for k, v in row.items() if v is not None}
    if "messages" in present:
        return "chat", None
    if "conversations" in present:
        return "sharegpt", None
    if present & {"chosen", "rejected"}:
        return ("preference" if "prompt" in present else "preference_implicit"), None
    if "label" in present and "completion" in present:
        return "unpaired_preference", None
    if "prompt" in present and "completion" not in present:
        return "prompt", None
    if present & {"prompt", "completion"}:
        return "prompt_completion", None
    if present & {"instruction", "output"}:
        return "alpaca", None
    if "text" in present:
        return "text", None
    if "input_ids" in present:
        return "tokens", None
    keys = ", ".join(sorted(str(k) for k in row)) or "none"
    return None, f"no known field (found: {keys}); {FORMAT_HELP}"


def _check_conversation(messages: list[dict[str, str]], key: str) -> list[dict[str, str]]:
    if not messages:
        raise RowError(f"empty conversation: '{key}' has no messages")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise RowError(f"{key}[{i}]: a system message is only allowed first")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise RowError("no assistant turn: there is nothing for the model to learn to answer")
    for i in assistants:
        if not messages[i]["content"].strip():
            raise RowError(f"{key}[{i}]: the assistant turn is empty")
    return messages


# key -> (speaker field, text field, the fields some exports use instead, speaker -> role, speakers shown)
_CONVERSATIONS: dict[str, tuple[str, str, tuple[str, str], dict[str, str], tuple[str, ...]]] = {
    "messages": ("role", "content", ("role", "content"), {r: r for r in ROLES}, ROLES),
    # ShareGPT writes from/value; some exports use role/content inside conversations.
    "conversations": ("from", "value", ("role", "content"), SHAREGPT_ROLES, ("system", "human", "gpt")),
}


def _normalise_conversation(row: dict[str, Any], where: str, key: str) -> Example:
    speaker_key, text_key, (alt_speaker, alt_text), roles, shown = _CONVERSATIONS[key]
    turns = json_cell(row[key], key)
    if not isinstance(turns, list):
        raise RowError(f"field '{key}' must be a list of messages, got {type_name(turns)}")
    out: list[dict[str, str]] = []
    for i, t in enumerate(turns):
        what = f"{key}[{i}]"
        if not isinstance(t, dict):
            raise RowError(f"{what} must be an object with {speaker_key} and {text_key}, got {type_name(t)}")
        speaker, text = t.get(speaker_key, t.get(alt_speaker)), t.get(text_key, t.get(alt_text))
        if speaker is None:
            raise RowError(f"{what}: missing field '{speaker_key}'")
        if not isinstance(speaker, str):
            raise RowError(f"{what}: '{speaker_key}' must be a string, got {type_name(speaker)}")
        if speaker in TOOL_ROLES or (speaker == "assistant" and t.get("tool_calls")):
            raise RowError(
                f"{what}: tool-calling turns ({speaker_key} '{speaker}') are not supported; remove the tool turns or the row"
            )
        if speaker not in roles:
            # human/gpt: ShareGPT speakers written as chat roles
            hint = f"; did you mean '{SHAREGPT_ROLES[speaker]}'?" if speaker in SHAREGPT_ROLES else ""
            word = "role" if key == "messages" else "speaker"
            raise RowError(f"{what}: unknown {word} '{speaker}' (expected one of: {', '.join(shown)}){hint}")
        if text is None:
            raise RowError(f"{what}: missing field '{text_key}'")
        out.append({"role": roles[speaker], "content": content_text(text, what)})
    return Example(kind="chat", messages=_check_conversation(out, key), source=where)


def _normalise_alpaca(row: dict[str, Any], where: str) -> Example:
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", required=False, allow_empty=True)
    output = text_field(row, "output")
    system = text_field(row, "system", required=False, allow_empty=True)
    # Alpaca becomes a two-turn chat: instruction (and input, after a blank line) from the
    # user, output from the assistant; an optional `system` column becomes the system turn.
    user = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return Example(kind="chat", messages=messages, source=where)


def _normalise_prompt_completion(row: dict[str, Any], where: str) -> Example:
    prompt = text_field(row, "prompt")
    completion = text_field(row, "completion")
    return Example(kind="completion", prompt=prompt, completion=completion, source=where)


def _normalise_prompt(row: dict[str, Any], where: str) -> Example:
    prompt, messages, columns = normalise_prompt_row(row)
    return Example(kind="prompt", prompt=prompt, messages=messages, columns=columns, source=where)


def _normalise_text(row: dict[str, Any], where: str) -> Example:
    return Example(kind="text", text=text_field(row, "text"), source=where)


def _token_list(row: dict[str, Any], key: str, *, allow_ignore: bool) -> list[int]:
    value = json_cell(row.get(key), key)
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{key}' must be a non-empty list of token ids, got {type_name(value)}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and not (allow_ignore and v == -100)):
            raise RowError(
                f"field '{key}' must hold non-negative integers{' or -100' if allow_ignore else ''}, found {v!r}"
            )
    return value


def _normalise_tokens(row: dict[str, Any], where: str) -> Example:
    ids = _token_list(row, "input_ids", allow_ignore=False)
    labels = _token_list(row, "labels", allow_ignore=True) if row.get("labels") is not None else None
    if labels is not None and len(labels) != len(ids):
        raise RowError(f"'labels' has {len(labels)} entries but 'input_ids' has {len(ids)}; they must match")
    return Example(kind="tokens", input_ids=ids, labels=labels, source=where)


def _preference(pref: Preference, where: str) -> Example:
    return Example(kind="preference" if pref.paired else "unpaired", preference=pref, source=where)


_NORMALISERS = {
    "chat": lambda row, where: _normalise_conversation(row, where, "messages"),
    "sharegpt": lambda row, where: _normalise_conversation(row, where, "conversations"),
    "alpaca": _normalise_alpaca,
    "prompt_completion": _normalise_prompt_completion,
    "text": _normalise_text,
    "tokens": _normalise_tokens,
    "preference": lambda row, where: _preference(normalise_paired(row, explicit_prompt=True), where),
    "preference_implicit": lambda row, where: _preference(
        normalise_paired(row, explicit_prompt=False), where
    ),
    "unpaired_preference": lambda row, where: _preference(normalise_unpaired(row), where),
    "prompt": _normalise_prompt,
}
