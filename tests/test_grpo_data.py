"""GRPO's data (prompt rows with any other columns) and who may name a Python reward file (MCP policy).

Torch-free. The MCP tests run the server in process with the stand-in worker (test_server.py's).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import ListRootsResult, Root, TextContent

from backprop_mcp.server import build_server
from engine.contract.datasets import DatasetError
from engine.contract.spec import DatasetSettings
from engine.data.formats import inspect_dataset, load_examples

STANDIN = Path(__file__).with_name("test_server_worker_standin.py")


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_rows_are_detected_with_their_columns(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "math.jsonl",
        [
            {"prompt": "What is 2+3?", "answer": "5", "level": 1},
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*6?"}],
                "answer": 42,
            },
        ],
    )
    examples, report = load_examples(DatasetSettings(path=str(path)))
    assert report.format == "prompt" and report.kinds == {"prompt": 2}
    assert (examples[0].prompt, examples[0].messages, examples[0].columns) == (
        "What is 2+3?",
        None,
        {"answer": "5", "level": 1},
    )
    assert examples[1].prompt is None and examples[1].messages is not None
    assert examples[1].messages[-1] == {"role": "user", "content": "7*6?"}
    assert examples[1].columns == {"answer": 42}
    assert report.preview is not None and report.preview["columns"] == {"answer": "5", "level": "1"}


def test_bad_prompt_rows_are_named_with_their_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "fine", "answer": "1"},
            {"prompt": ""},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"prompt": [{"role": "tool", "content": "x"}]},
            {"prompt": 3},
        ],
    )
    report = inspect_dataset(str(path))
    messages = {p.line: p.message for p in report.problems}
    assert "empty" in messages[2]
    assert "last message is the assistant's" in messages[3]
    assert "role 'tool'" in messages[4]
    assert "text or a list of messages" in messages[5]
    assert report.rows_ok == 1 and report.format == "prompt"


def test_columns_named_as_the_reward_calls_own_arguments_are_refused_with_their_line(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "clash.jsonl",
        [
            {"prompt": "fine", "answer": "1"},
            {"prompt": "q", "completions": ["a", "b"]},
            {"prompt": "q", "completion_ids": [1, 2]},
            {"prompt": "q", "prompts": "x"},
        ],
    )
    report = inspect_dataset(str(path))
    messages = {p.line: p.message for p in report.problems}
    assert set(messages) == {2, 3, 4} and report.rows_ok == 1, messages
    for line, name in ((2, "completions"), (3, "completion_ids"), (4, "prompts")):
        assert f"column '{name}' has the name of an argument the reward functions are given" in messages[line]
        assert f"rename the column (e.g. to 'row_{name}')" in messages[line]
    with pytest.raises(DatasetError, match=r"clash\.jsonl:2: .*column 'completions'"):
        load_examples(DatasetSettings(path=str(path)))


def test_a_prompt_row_among_pairs_is_a_pair_missing_its_completion(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "c"}])
    (problem,) = inspect_dataset(str(path)).problems
    assert problem.line == 3 and "missing field 'completion'" in problem.message


# -- reward code from an MCP tool --------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _server(home: Path) -> Any:
    return build_server(
        home, worker_command=[sys.executable, str(STANDIN), "--steps", "2", "--step-s", "0.01"]
    )


def _roots(*folders: Path) -> Any:
    async def list_roots(_ctx: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=f.as_uri(), name=f.name) for f in folders])

    return list_roots


async def _start(client: Client, data: Path, reward: Path) -> tuple[bool, str, Any]:
    args = {
        "dataset_path": str(data),
        "method": "grpo",
        "grpo_rewards": [{"name": "python", "path": str(reward)}],
    }
    result = await client.call_tool("start_finetune", args)
    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
    return bool(result.is_error), text, result.structured_content


@pytest.mark.anyio
async def test_reward_code_from_mcp_needs_the_switch_and_a_chosen_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    project = tmp_path / "project"
    project.mkdir()
    data = _jsonl(project / "math.jsonl", [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(4)])
    reward = project / "my_reward.py"
    reward.write_text("def reward(prompts, completions, **columns):\n    return [0.0 for _ in completions]\n")
    monkeypatch.delenv("BACKPROP_ALLOW_REWARD_CODE", raising=False)
    monkeypatch.delenv("BACKPROP_ALLOWED_DIRS", raising=False)

    async with Client(_server(home), list_roots_callback=_roots(project)) as client:
        refused, text, _ = await _start(client, data, reward)
    print(f"\nreward code off: {text}")
    assert refused and "BACKPROP_ALLOW_REWARD_CODE=1" in text and "Nothing was started" in text
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())

    monkeypatch.setenv("BACKPROP_ALLOW_REWARD_CODE", "1")
    async with Client(_server(home)) as client:  # no roots, no BACKPROP_ALLOWED_DIRS: no chosen folder
        refused, text, _ = await _start(client, data, reward)
    print(f"no chosen folder: {text}")
    assert refused and "not inside a folder the user chose" in text and "BACKPROP_ALLOWED_DIRS" in text

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with Client(_server(home), list_roots_callback=_roots(project, elsewhere)) as client:
        outside = tmp_path / "outside.py"
        outside.write_text(reward.read_text())
        refused, text, _ = await _start(client, data, outside)
        assert refused and "outside the folders this server may use" in text
        refused, text, started = await _start(client, data, reward)
    assert not refused, text
    assert started["spec"]["method"] == "grpo"
    assert started["spec"]["grpo"]["rewards"][0]["path"] == str(reward.resolve())

    monkeypatch.setenv("BACKPROP_ALLOWED_DIRS", str(project))
    async with Client(_server(home)) as client:  # the environment's folders count as chosen too
        refused, text, _ = await _start(client, data, reward)
    assert not refused, text


@pytest.mark.anyio
async def test_check_dataset_shows_the_grpo_plan_and_a_missing_answer_column(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """check_dataset runs the engine's check-data (a real subprocess): the rewards travel as JSON."""
    good = _jsonl(tmp_path / "math.jsonl", [{"prompt": f"{i}+1?", "answer": str(i + 1)} for i in range(4)])
    bad = _jsonl(
        tmp_path / "no_answer.jsonl", [{"prompt": f"{i}+1?", "solution": str(i + 1)} for i in range(4)]
    )
    args = {"model": str(tiny_model_dir), "method": "grpo", "grpo_rewards": [{"name": "answer"}]}
    async with Client(_server(tmp_path / "home")) as client:
        ok = (await client.call_tool("check_dataset", {"path": str(good), **args})).structured_content
        refused = (await client.call_tool("check_dataset", {"path": str(bad), **args})).structured_content
    assert ok is not None and refused is not None
    print(f"\nplan: {ok['defaults']}\nrefused: {refused['method_problem']}")
    assert ok["format"] == "prompt" and ok["ready"] and ok["defaults"]["grpo_num_generations"] == 4
    assert not refused["ready"] and "reads the column 'answer'" in refused["method_problem"]
    assert "solution" in refused["method_problem"]
