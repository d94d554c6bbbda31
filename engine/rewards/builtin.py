"""The built-in rewards, each chosen by its name in a job's ``grpo_rewards`` with its parameters.

answer  1.0 where the answer found in the completion equals the row's answer column, else 0.0; None
        where the row has no answer. Numbers compare as numbers (``1,000`` = ``1000.0``), other text
        case-insensitively with spaces collapsed.
format  1.0 where the completion matches the regular expression (whole or anywhere), else 0.0.
json    1.0 where the completion is JSON (and valid against the JSON Schema, if one is given), else 0.0.
length  DAPO's soft overlong punishment on the completion's token count (trl's
        ``get_soft_overlong_punishment``): 0 up to ``max_tokens - cache_tokens``, then linearly down to
        -1 at ``max_tokens``, -1 beyond.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from engine.contract.grpo import AnswerReward, FormatReward, JsonReward, LengthReward

RewardFn = Callable[..., list[float | None]]

_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FENCED = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """A completion as text: itself, or the content of its messages (message prompts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str, how: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """The answer written in ``text``: see ``AnswerReward.extract``."""
    if how == "regex":
        assert pattern is not None
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return last.group(1) if pattern.groups else last.group(0)
    if how == "boxed":
        return last_boxed(text)
    if how == "last_number":
        return last_number(text)
    boxed = last_boxed(text)
    return boxed if boxed is not None else last_number(text)


def _as_number(text: str) -> float | None:
    cleaned = text.strip().strip("$").strip().rstrip(".").replace(",", "").replace(" ", "")
    cleaned = cleaned.removesuffix("%")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _normalised(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text.strip().strip("$").strip())
    return " ".join(text.rstrip(".").split()).casefold()


def answers_equal(found: str, expected: Any) -> bool:
    """Whether the extracted answer ``found`` equals the row's ``expected`` answer."""
    expected_text = str(expected)
    a, b = _as_number(found), _as_number(expected_text)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    return _normalised(found) == _normalised(expected_text)


def answer_reward(settings: AnswerReward) -> RewardFn:
    pattern = re.compile(settings.pattern, re.DOTALL) if settings.pattern else None

    def answer(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        expected = columns.get(settings.column)
        if expected is None:
            raise KeyError(
                f"the answer reward reads the column {settings.column!r}, which the dataset's rows do not have"
            )
        out: list[float | None] = []
        for completion, right in zip(completions, expected, strict=True):
            if right is None or (isinstance(right, str) and not right.strip()):
                out.append(None)
                continue
            found = extract_answer(completion_text(completion), settings.extract, pattern)
            out.append(1.0 if found is not None and answers_equal(found, right) else 0.0)
        return out

    return answer


def format_reward(settings: FormatReward) -> RewardFn:
    pattern = re.compile(settings.pattern, re.DOTALL)
    test = pattern.fullmatch if settings.match == "full" else pattern.search

    def format_(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        return [1.0 if test(completion_text(c)) else 0.0 for c in completions]

    return format_


def json_reward(settings: JsonReward) -> RewardFn:
    validator = None
    if settings.json_schema is not None:
        from jsonschema import validators  # installed with mcp; loaded only for a schema

        validator = validators.validator_for(settings.json_schema)(settings.json_schema)

    def parse(text: str) -> tuple[bool, Any]:
        if settings.strip_fences and (fenced := _FENCED.search(text)):
            text = fenced.group(1)
        try:
            return True, json.loads(text)
        except ValueError:
            return False, None

    def json_(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            ok, value = parse(completion_text(c))
            out.append(1.0 if ok and (validator is None or validator.is_valid(value)) else 0.0)
        return out

    return json_


def soft_overlong(length: int, max_tokens: int, cache_tokens: int) -> float:
    """DAPO's soft overlong punishment of one completion of ``length`` tokens."""
    if length <= max_tokens - cache_tokens:
        return 0.0
    if length <= max_tokens:
        return (max_tokens - cache_tokens - length) / cache_tokens
    return -1.0


def length_reward(settings: LengthReward, max_completion_length: int) -> RewardFn:
    max_tokens = settings.max_tokens or max_completion_length
    cache = min(settings.cache_tokens or max(1, max_tokens // 4), max_tokens)

    def length(
        prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]], **_: Any
    ) -> list[float | None]:
        return [soft_overlong(len(ids), max_tokens, cache) for ids in completion_ids]

    return length
