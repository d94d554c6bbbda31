"""engine.data.formats: every source and row format loads; every kind of bad row is named with file and line."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.contract.datasets import DatasetError
from engine.contract.spec import DatasetSettings
from engine.data.formats import Example, inspect_dataset, load_examples, split_for_eval

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CHAT_ROW = {
    "messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
}


GOOD_ROWS = {  # one good row per format, keyed by the field that marks the format
    "messages": CHAT_ROW,
    "conversations": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    "instruction": {"instruction": "Say A.", "output": "A"},
    "prompt": {"prompt": "P", "completion": "C"},
    "text": {"text": "Some text."},
}


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(path: Path | str, **settings: object) -> tuple[list[Example], object]:
    return load_examples(DatasetSettings(path=str(path), **settings))


def only_problem(path: Path) -> str:
    report = inspect_dataset(str(path))
    assert report.bad_rows == 1, report.problems
    return str(report.problems[0])


# --- the shipped examples ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt", "kind"),
    [
        ("chat", "chat", "chat"),
        ("sharegpt", "sharegpt", "chat"),
        ("alpaca", "alpaca", "chat"),
        ("prompt_completion", "prompt_completion", "completion"),
        ("text", "text", "text"),
    ],
)
def test_example_files_load(name: str, fmt: str, kind: str) -> None:
    examples, report = load(EXAMPLES / f"{name}.jsonl")
    assert report.format == fmt
    assert 100 <= report.rows_total <= 200
    assert report.rows_ok == report.rows_total == len(examples)
    assert report.bad_rows == report.skipped == 0
    assert {ex.kind for ex in examples} == {kind}
    assert examples[0].source == f"{name}.jsonl:1"


def test_make_examples_is_deterministic(tmp_path: Path) -> None:
    # The generator writes next to itself: run a copy in a temp folder and compare with the repo.
    script = tmp_path / "make_examples.py"
    script.write_text((EXAMPLES / "make_examples.py").read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run([sys.executable, str(script)], check=True)
    for name in ("chat", "sharegpt", "alpaca", "prompt_completion", "text"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (EXAMPLES / f"{name}.jsonl").read_bytes()


# --- normalisation of each format ----------------------------------------------------------------


def test_chat_rows_keep_roles_and_drop_extra_keys(tmp_path: Path) -> None:
    row = {
        "id": 7,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello", "name": "bot"},
        ],
    }
    (ex,), _ = load(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert ex.kind == "chat"
    assert ex.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_roles_are_mapped(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    (ex,), report = load(write_jsonl(tmp_path / "s.jsonl", [row]))
    assert report.format == "sharegpt"
    assert [m["role"] for m in ex.messages or []] == ["system", "user", "assistant"]


def test_alpaca_input_joins_the_instruction(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
        {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
        {"instruction": "Add.", "input": "1 + 1", "output": "2", "system": "Be exact."},
    ]
    (a, b, c), report = load(write_jsonl(tmp_path / "a.jsonl", rows))
    assert report.format == "alpaca"
    assert a.messages == [
        {"role": "user", "content": "Reverse the word.\n\napple"},
        {"role": "assistant", "content": "elppa"},
    ]
    assert b.messages == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert c.messages and c.messages[0] == {"role": "system", "content": "Be exact."}


def test_prompt_completion_and_text(tmp_path: Path) -> None:
    (pc,), _ = load(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "completion": "C"}]))
    assert (pc.kind, pc.prompt, pc.completion) == ("completion", "P", "C")
    (tx,), _ = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "Some text."}]))
    assert (tx.kind, tx.text) == ("text", "Some text.")


# --- sources ---------------------------------------------------------------------------------------


def test_json_list_and_wrapped_list(tmp_path: Path) -> None:
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([CHAT_ROW, CHAT_ROW]), encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"train": [CHAT_ROW]}), encoding="utf-8")
    assert len(load(listed)[0]) == 2
    (ex,), report = load(wrapped)
    assert report.source_type == "json" and ex.source == "wrapped.json row 1"
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [CHAT_ROW, CHAT_ROW], "test": [CHAT_ROW]}), encoding="utf-8")
    assert len(load(splits)[0]) == 2
    (ex,), _ = load(splits, split="test")
    assert ex.source == "splits.json[test] row 1"
    with pytest.raises(
        DatasetError, match=r"under 'dev' \(the split asked for\); found an object with keys: test, train"
    ):
        load(splits, split="dev")


def test_json_errors_name_the_problem(tmp_path: Path) -> None:
    jsonl_named_json = tmp_path / "rows.json"
    jsonl_named_json.write_text(json.dumps(CHAT_ROW) + "\n" + json.dumps(CHAT_ROW) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"rows\.json:2: not valid JSON.*rename it to \.jsonl"):
        inspect_dataset(str(jsonl_named_json))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"items": []}), encoding="utf-8")
    with pytest.raises(DatasetError, match="found an object with keys: items"):
        inspect_dataset(str(obj))


def test_csv_alpaca_and_chat_cells(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Reverse the word.", "stone", "enots"])
        w.writerow(["Say hi.", "", "hi\nthere"])  # a quoted cell across two lines
        w.writerow(["Add.", "1 + 1", ""])  # line 5 (the previous row spans lines 3-4)
    report = inspect_dataset(str(path))
    assert (report.format, report.rows_total, report.rows_ok) == ("alpaca", 3, 2)
    assert str(report.problems[0]) == "a.csv:5: missing field 'output'"

    chat_csv = tmp_path / "c.csv"
    with open(chat_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT_ROW["messages"])])
    (ex,), _ = load(chat_csv)
    assert ex.messages == CHAT_ROW["messages"] and ex.source == "c.csv:2"


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT_ROW, {"messages": [{"role": "user", "content": "x"}]}]), path)
    report = inspect_dataset(str(path))
    assert (report.source_type, report.format, report.rows_ok) == ("parquet", "chat", 1)
    assert str(report.problems[0]).startswith("d.parquet row 2: no assistant turn")


def test_saved_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(
        [{"prompt": "P1", "completion": "C1"}, {"prompt": "P2", "completion": "C2"}]
    )
    ds.save_to_disk(str(tmp_path / "single"))
    examples, report = load(tmp_path / "single")
    assert report.source_type == "saved_dataset" and [e.prompt for e in examples] == ["P1", "P2"]

    dd = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load(tmp_path / "dict")[0]) == 2  # "train" by default
    (ex,), _ = load(tmp_path / "dict", split="test")
    assert ex.source == "dict[test] row 1"
    with pytest.raises(DatasetError, match="no split 'validation'; its splits are: train, test"):
        load(tmp_path / "dict", split="validation")


def test_missing_unknown_and_hub_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset file not found"):
        inspect_dataset(str(tmp_path / "nope.jsonl"))
    odd = tmp_path / "rows.txt"
    odd.write_text("hello\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"unknown file type '\.txt'"):
        inspect_dataset(str(odd))
    plain_dir = tmp_path / "folder"
    plain_dir.mkdir()
    with pytest.raises(DatasetError, match="not one saved with datasets' save_to_disk"):
        inspect_dataset(str(plain_dir))
    # Not a path: taken as a hub name, which cannot load here (tests run with HF_HUB_OFFLINE=1).
    with pytest.raises(DatasetError) as err:
        inspect_dataset("someone/some-dataset")
    message = str(err.value)
    assert "not a local file or folder" in message and "Hugging Face Hub" in message
    assert "offline" in message or "unreachable" in message


# --- bad rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"messages": [', "not valid JSON"),
        ("[1, 2]", "expected an object with named fields, got a list"),
        ({"messages": []}, "empty conversation"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            "unknown role 'human'",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]},
            "content must be a string, got a number",
        ),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
            "messages[1]: missing field 'content'",
        ),
        ({"messages": [{"content": "Hi"}]}, "messages[0]: missing field 'role'"),
        (
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
            "assistant turn is empty",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "system", "content": "S"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "system message is only allowed first",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "tool", "content": "{}"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "tool-calling turns (role 'tool') are not supported",
        ),
        ({"messages": "hello"}, "not a JSON list of messages"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown speaker 'bot'"),
        (
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "A"}]},
            "conversations[0]: missing field 'value'",
        ),
        ({"instruction": "Do it."}, "missing field 'output'"),
        ({"instruction": "Do it.", "output": ["a"]}, "field 'output' must be a string, got a list"),
        ({"prompt": "P"}, "missing field 'completion'"),
        ({"prompt": "P", "completion": ""}, "field 'completion' is empty"),
        ({"text": 5}, "field 'text' must be a string, got a number"),
        ({"question": "Q", "answer": "A"}, "no known field (found: answer, question)"),
        (
            {"chosen": "A", "rejected": "B"},
            "this row is in preference_implicit format but most rows of the file are chat",
        ),
    ],
)
def test_each_bad_row_is_named_with_file_and_line(tmp_path: Path, row: object, expected: str) -> None:
    # Line 1 is a good row of the bad row's own format (so the file is not mixed); the bad row
    # is line 3, after a blank line, which is not a row but still counts as a line of the file.
    keys = set(row) if isinstance(row, dict) else set()
    good = next((g for k, g in GOOD_ROWS.items() if k in keys), CHAT_ROW)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", row])
    report = inspect_dataset(str(path))
    bad = [p for p in report.problems if p.line == 3]
    assert len(bad) == 1, report.problems
    assert bad[0].file == "bad.jsonl"
    assert expected in bad[0].message, bad[0].message
    assert str(bad[0]).startswith("bad.jsonl:3: ")


def test_load_refuses_bad_rows_with_an_actionable_message(tmp_path: Path) -> None:
    rows = [CHAT_ROW, "{oops", {"messages": []}, CHAT_ROW]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetError) as err:
        load(path)
    message = str(err.value)
    assert "2 of 4 rows are bad" in message
    assert "d.jsonl:2: not valid JSON" in message and "d.jsonl:3: empty conversation" in message
    assert "skip_bad_rows" in message
    assert err.value.report is not None and err.value.report.bad_rows == 2


def test_skip_bad_rows_skips_and_counts(tmp_path: Path) -> None:
    rows = [CHAT_ROW, "{oops", {"messages": []}, CHAT_ROW]
    examples, report = load(write_jsonl(tmp_path / "d.jsonl", rows), skip_bad_rows=True)
    assert [ex.source for ex in examples] == ["d.jsonl:1", "d.jsonl:4"]
    assert (report.rows_total, report.rows_ok, report.skipped) == (4, 2, 2)
    assert report.to_dict()["problems"] == [
        "d.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes at column 2)",
        "d.jsonl:3: empty conversation: 'messages' has no messages",
    ]


def test_a_file_with_only_bad_rows_is_refused_even_when_skipping(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no usable rows"):
        load(write_jsonl(tmp_path / "d.jsonl", ["{oops"]), skip_bad_rows=True)


def test_mixed_formats_are_an_error_that_names_the_mix(tmp_path: Path) -> None:
    rows = [CHAT_ROW, CHAT_ROW, {"prompt": "P", "completion": "C"}]
    path = write_jsonl(tmp_path / "mix.jsonl", rows)
    report = inspect_dataset(str(path))
    assert report.format == "mixed" and report.formats_found == {"chat": 2, "prompt_completion": 1}
    assert "mix.jsonl:3: this row is in prompt_completion format but most rows of the file are chat" in str(
        report.problems[0]
    )
    with pytest.raises(DatasetError, match=r"mixes formats: chat \(2 rows\), prompt_completion \(1 row\)"):
        load(path)


def test_inspect_never_raises_for_bad_rows_and_reports_stats(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["{", CHAT_ROW])
    report = inspect_dataset(str(path))
    assert (report.rows_total, report.rows_ok, report.bad_rows, report.skipped) == (2, 1, 1, 0)
    assert report.chars == {"min": 15, "mean": 15.0, "max": 15}
    d = report.to_dict()
    assert d["format"] == "chat" and d["problems"] == [
        "d.jsonl:1: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    assert d["preview"] == {"kind": "chat", "source": "d.jsonl:2", "messages": CHAT_ROW["messages"]}


def test_non_utf8_line_is_a_row_problem(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(CHAT_ROW).encode() + b"\n" + '{"text": "caf\xe9"}'.encode("latin-1") + b"\n")
    assert "latin1.jsonl:2: not UTF-8 text" in only_problem(path)


def test_split_for_eval_is_reproducible_and_disjoint() -> None:
    examples = [Example(kind="text", text=str(i), source=f"x:{i}") for i in range(20)]
    train, held = split_for_eval(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert {e.source for e in train}.isdisjoint({e.source for e in held})
    assert split_for_eval(examples, 0.1, seed=3) == (train, held)
    assert split_for_eval(examples, 0.0) == (examples, [])


def test_data_module_imports_without_torch() -> None:
    code = "import sys, engine.data.formats, engine.data.tokenizing; assert not {'torch', 'transformers', 'datasets', 'pyarrow'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
