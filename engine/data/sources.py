"""Reading a dataset's raw rows, before any validation (standard library; ``datasets``/``pyarrow`` lazily).

``.jsonl`` (one JSON object a line), ``.json`` (a list of rows, or an object holding the list
under ``data``, ``rows`` or ``train``), ``.csv`` (a header row; ``messages`` and ``conversations``
cells may hold JSON text), ``.parquet``, a folder written by ``datasets.save_to_disk`` (a
``Dataset``, or a ``DatasetDict`` plus ``split``), and anything else is taken as a Hugging Face
Hub dataset name. A row that cannot even be parsed comes back with its ``error``; a source that
cannot be read at all raises DatasetError.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.contract.datasets import DatasetError
from engine.contract.files import PathError, looks_like_path, path_kind, quoted, user_path

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
JSON_LIST_KEYS = ("data", "rows", "train")


@dataclass
class RawRow:
    position: int  # line (JSONL/CSV) or 1-based row number
    value: Any = None
    error: str | None = None  # set when the row could not even be parsed


@dataclass
class Source:
    label: str  # the file name shown in messages
    unit: Literal["line", "row"]
    source_type: str
    rows: Iterator[RawRow]


def type_name(value: Any) -> str:
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


def is_hub_dataset(path: str) -> bool:
    """A name the worker downloads from the hub, rather than a file or folder on this machine."""
    try:
        exists = path_kind(user_path(path, "dataset"), "dataset") is not None
    except PathError:  # something is there but unusable (a FIFO, a name too long): not a hub name
        exists = True
    return not exists and not looks_like_path(path)


def open_source(path: str, split: str | None) -> Source:
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
    if looks_like_path(path):
        raise DatasetError(f"dataset file not found: {quoted(path)} (looked for {quoted(p.resolve())})")
    return _hub_source(path, split)


def _jsonl_source(p: Path) -> Source:
    def rows() -> Iterator[RawRow]:
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                    raw = raw[3:]
                if not raw.strip():
                    continue  # blank lines (often a trailing one) are not rows
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield RawRow(n, error=f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
                    continue
                text = text.rstrip("\r\n")
                try:
                    yield RawRow(n, json.loads(text))
                except json.JSONDecodeError as e:
                    yield RawRow(n, error=f"not valid JSON ({e.msg} at column {e.pos + 1})")

    p.open("rb").close()  # fail now (DatasetError) rather than midway when unreadable
    return Source(p.name, "line", "jsonl", rows())


def _json_source(p: Path, split: str | None = None) -> Source:
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
        raise DatasetError(f"{p}: expected a list of rows, got {type_name(data)}")
    return Source(label, "row", "json", _rows_of(data))


def _csv_source(p: Path) -> Source:
    def rows() -> Iterator[RawRow]:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield RawRow(1, error=f"cannot read the header row ({e})")
                return
            start = reader.line_num + 1
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError:
                    yield RawRow(start, error="not UTF-8 text; save the file as UTF-8")
                    return
                except csv.Error as e:
                    yield RawRow(start, error=f"not valid CSV ({e})")
                    return
                line, start = start, reader.line_num + 1
                if not any(c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    yield RawRow(line, error=f"has {len(cells)} cells but the header has {len(header)}")
                    continue
                # An empty cell is a missing value (a CSV cannot tell "" from absent).
                yield RawRow(line, {h: (c if c != "" else None) for h, c in zip(header, cells, strict=True)})

    p.open("rb").close()
    return Source(p.name, "line", "csv", rows())


def _parquet_source(p: Path) -> Source:
    try:  # pyarrow and datasets load where used: the data checks import this module without them
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with the train extra
        raise DatasetError("reading Parquet needs pyarrow: pip install 'backprop-mcp[train]'") from e
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{p}: cannot read the Parquet file ({e})") from e
    return Source(p.name, "row", "parquet", _rows_of(table.to_pylist()))


def _rows_of(records: Any) -> Iterator[RawRow]:
    for i, r in enumerate(records, start=1):
        yield RawRow(i, r)


def _saved_dataset_source(p: Path, split: str | None) -> Source:
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
    return _dataset_source(loaded, split, str(p), p.name, "saved_dataset")


def _dataset_source(loaded: Any, split: str | None, where: str, name: str, source_type: str) -> Source:
    """Rows of a loaded ``datasets`` object; a DatasetDict gives the split asked for (or its only/train one)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        split = _choose_split(list(loaded.keys()), split, where)
        loaded = loaded[split]
    return Source(f"{name}[{split}]" if split else name, "row", source_type, _rows_of(iter(loaded)))


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


def _hub_source(name: str, split: str | None) -> Source:
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
    return _dataset_source(loaded, split, name, name, "hub")


def _hub_error_message(name: str, error: Exception) -> str:
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
