"""GRPO rewards (engine.rewards): the built-in ones, the user's file, the weighted sum. Torch-free."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from engine.contract.grpo import REWARD_ARGUMENTS, GrpoSettings
from engine.contract.settings import training_spec
from engine.contract.spec import FinetuneSpec
from engine.rewards.builtin import extract_answer, last_boxed
from engine.rewards.scoring import Reward, build_rewards, score
from engine.rewards.user_code import RewardCodeError, load_reward_function


def _rewards(*items: object, max_len: int = 64):  # type: ignore[no-untyped-def]
    return build_rewards(GrpoSettings(rewards=list(items)).rewards, max_len)


def _one(reward: object, completions: list[object], **columns: list[object]) -> list[float]:
    (r,) = _rewards(reward)
    ids = [[0] * len(str(c)) for c in completions]
    return score([r], ["p"] * len(completions), completions, ids, columns).per_function[r.label]


def test_answer_extraction_boxed_last_number_and_regex() -> None:
    assert last_boxed(r"so \boxed{\frac{1}{2}} and then \boxed{42}") == "42"
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{unclosed") is None
    assert extract_answer("3 apples and 1,250 pears.", "last_number") == "1,250"
    assert extract_answer(r"about 3, finally \boxed{7}", "auto") == "7"
    assert extract_answer("<answer> 12 </answer>", "auto") == "12"
    import re

    assert extract_answer("<a>x</a> then <a>y</a>", "regex", re.compile("<a>(.*?)</a>")) == "y"


def test_answer_reward_compares_numbers_as_numbers_and_skips_rows_without_answer() -> None:
    got = _one(
        {"name": "answer"},
        [r"\boxed{1,000}", "it is 3.50", "I think 4", "The answer: Paris.", "12"],
        answer=[1000, "3.5", "5", "paris", None],
    )
    assert got[:4] == [1.0, 1.0, 0.0, 0.0]  # "paris" is no number and auto takes numbers
    assert math.isnan(got[4])
    text = _one(
        {"name": "answer", "pattern": r"Answer:\s*(\w+)"},
        ["Answer: Paris.", "Answer: Rome"],
        answer=["paris"] * 2,
    )
    assert text == [1.0, 0.0]
    messages = [[{"role": "assistant", "content": r"\boxed{9}"}]]  # completions of message prompts
    assert _one({"name": "answer"}, messages, answer=["9"]) == [1.0]


def test_format_json_and_length_rewards() -> None:
    fmt = {"name": "format", "pattern": r"<think>.*</think><answer>.*</answer>"}
    both = ["<think>a\nb</think><answer>3</answer>", "x<think></think><answer></answer>"]
    assert _one(fmt, both) == [1.0, 0.0]
    assert _one({**fmt, "match": "search"}, ["x<think></think><answer></answer>"]) == [1.0]
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    completions = ['{"name": "a"}', '```json\n{"name": "b"}\n```', "{'name': 1}", '{"name": 3}']
    assert _one({"name": "json"}, completions) == [1.0, 1.0, 0.0, 1.0]
    assert _one({"name": "json", "json_schema": schema}, completions) == [1.0, 1.0, 0.0, 0.0]


def test_length_reward_is_trls_soft_overlong_punishment() -> None:
    from trl.rewards import get_soft_overlong_punishment

    trl_fn = get_soft_overlong_punishment(max_completion_len=100, soft_punish_cache=20)
    (ours,) = _rewards({"name": "length", "max_tokens": 100, "cache_tokens": 20})
    ids = [[1] * n for n in (10, 80, 81, 90, 100, 101, 150)]
    got = ours.fn(["p"] * len(ids), ["c"] * len(ids), completion_ids=ids)
    assert got == pytest.approx(trl_fn(ids))
    # max_tokens defaults to the job's max_completion_length, the soft zone to a quarter of it
    (default,) = _rewards("length", max_len=40)
    assert default.fn(["p"], ["c"], completion_ids=[[1] * 35]) == [pytest.approx(-0.5)]


def test_weights_sum_over_the_rewards_that_apply() -> None:
    rewards = _rewards(
        {"name": "format", "pattern": r"\d+", "weight": 0.5},
        {"name": "answer", "weight": 2.0},
    )
    scores = score(rewards, ["p"] * 3, ["7", "8", "x"], [[1], [1], [1]], {"answer": ["7", None, "1"]})
    assert scores.per_function["format"] == [1.0, 1.0, 0.0]
    assert scores.total == [2.5, 0.5, 0.0]  # the second row has no answer: only the format counts
    (only_answer,) = _rewards("answer")
    assert math.isnan(score([only_answer], ["p"], ["7"], [[1]], {"answer": [None]}).total[0])
    twice = _rewards({"name": "format", "pattern": "a"}, {"name": "format", "pattern": "b"})
    assert [r.label for r in twice] == ["format", "format_2"]


def test_rewards_setting_shorthands_and_refusals() -> None:
    spec = training_spec(
        FinetuneSpec, "d.jsonl", method="grpo", grpo_rewards='[{"name": "answer"}, "json", "/x/mine.py"]'
    )
    assert [r.name for r in spec.grpo.rewards] == ["answer", "json", "python"]
    with pytest.raises(ValidationError, match="not a valid regular expression"):
        GrpoSettings(rewards=[{"name": "format", "pattern": "(("}])
    with pytest.raises(ValidationError, match="not a valid JSON Schema"):
        GrpoSettings(rewards=[{"name": "json", "json_schema": {"type": 3}}])
    with pytest.raises(ValidationError, match="needs pattern"):
        GrpoSettings(rewards=[{"name": "answer", "extract": "regex"}])
    with pytest.raises(ValidationError, match="needs at least one reward"):
        training_spec(FinetuneSpec, "d.jsonl", method="grpo")
    with pytest.raises(ValidationError, match="grpo_beta applies to method 'grpo'"):
        training_spec(FinetuneSpec, "d.jsonl", grpo_beta=0.1)


def _write(tmp_path: Path, text: str, name: str = "my_reward.py") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_user_reward_file_gets_prompts_completions_and_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "def reward(prompts, completions, answer, completion_ids, **other):\n"
        "    return [float(c.strip() == a) + 0.01 * len(ids) for c, a, ids in zip(completions, answer, completion_ids)]\n",
    )
    (r,) = _rewards(str(path))
    assert r.label == "my_reward"
    scores = score([r], ["q1", "q2"], [" 4", "5"], [[1, 2], [3]], {"answer": ["4", "6"], "topic": ["x", "y"]})
    assert scores.total == pytest.approx([1.02, 0.01])


def test_a_reward_is_called_with_its_declared_arguments_and_the_columns() -> None:
    """The names the data check keeps columns from (REWARD_ARGUMENTS) are the call's own."""
    called: dict[str, object] = {}

    def spy(prompts: list[object], completions: list[object], **named: object) -> list[float]:
        called.update(prompts=prompts, completions=completions, **named)
        return [0.0] * len(completions)

    score([Reward("spy", 1.0, spy)], ["p"], ["c"], [[1, 2]], {"answer": ["4"]})
    assert set(called) == {*REWARD_ARGUMENTS, "answer"}


def test_user_reward_failures_name_the_file_and_line(tmp_path: Path) -> None:
    raising = _write(
        tmp_path,
        "def helper(c):\n    return 1 / 0\n\ndef reward(prompts, completions, **columns):\n"
        "    return [helper(c) for c in completions]\n",
    )
    with pytest.raises(RewardCodeError, match=rf"{raising}:2: .*raised ZeroDivisionError"):
        load_reward_function(raising)(["p"], ["c"])
    broken = _write(tmp_path, "def reward(:\n", "broken.py")
    with pytest.raises(RewardCodeError, match=rf"{broken}:1: the reward file failed to load: SyntaxError"):
        load_reward_function(broken)
    importing = _write(tmp_path, "x = 1\nimport no_such_module_here\n", "importing.py")
    with pytest.raises(RewardCodeError, match=rf"{importing}:2: .*ModuleNotFoundError"):
        load_reward_function(importing)
    other = _write(tmp_path, "def score(p, c):\n    return [0.0]\n", "other.py")
    with pytest.raises(RewardCodeError, match=r"has no function 'reward' \(it defines: score\)"):
        load_reward_function(other)
    short = _write(tmp_path, "def reward(p, c, **k):\n    return [1.0]\n", "short.py")
    with pytest.raises(RewardCodeError, match="returned 1 rewards for 2 completions"):
        load_reward_function(short)(["p", "p"], ["a", "b"])
    texty = _write(tmp_path, "def reward(p, c, **k):\n    return ['high']\n", "texty.py")
    with pytest.raises(RewardCodeError, match="returned 'high'"):
        load_reward_function(texty)(["p"], ["a"])
    with pytest.raises(RewardCodeError, match="reward file not found"):
        load_reward_function(tmp_path / "missing.py")


def test_a_reward_file_that_exits_fails_with_its_file_and_line(tmp_path: Path) -> None:
    """sys.exit() is a SystemExit, not an Exception: it too names the file and line (it would otherwise
    end the worker without them)."""
    exiting = _write(
        tmp_path,
        "import sys\n\ndef reward(prompts, completions, **columns):\n    sys.exit(3)\n",
        "exiting.py",
    )
    with pytest.raises(
        RewardCodeError, match=rf"{exiting}:4: the reward function 'reward' raised SystemExit: 3"
    ):
        load_reward_function(exiting)(["p"], ["c"])
    on_load = _write(tmp_path, "x = 1\nraise SystemExit('no')\n", "on_load.py")
    with pytest.raises(
        RewardCodeError, match=rf"{on_load}:2: the reward file failed to load: SystemExit: no"
    ):
        load_reward_function(on_load)
    stopped = _write(tmp_path, "def reward(p, c, **k):\n    raise KeyboardInterrupt\n", "stopped.py")
    with pytest.raises(KeyboardInterrupt):  # the worker's stop: it ends the job as cancelled
        load_reward_function(stopped)(["p"], ["c"])
