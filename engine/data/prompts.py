"""Prompt rows: what a GRPO job learns from (method 'grpo'), torch-free.

    ``{"prompt": "What is 3+4?", "answer": "7"}``
    ``{"prompt": [{"role": "system", ...}, {"role": "user", "content": "What is 3+4?"}], "answer": "7"}``

A row with a ``prompt`` and no ``completion`` (nor ``chosen``/``rejected``) is a prompt row. The
prompt is text or a list of messages (roles system/user/assistant, the last one the user's); every
other column of the row is kept and reaches the reward functions by name, as trl's GRPOTrainer passes
them (``answer=[...]``); a column named as one of the call's own arguments (``prompts``,
``completions``, ``completion_ids``) is refused. engine.data.formats detects the format and calls
``normalise_prompt_row``; this module knows nothing of the other formats.

How a prompt is rendered for the model (engine.training.grpo_data): messages through the tokenizer's
chat template with the assistant's turn opened; a text prompt as one user turn where the tokenizer has
a chat template (as the prompt/completion format is trained, so a GRPO run after SFT on such rows sees
its prompts the way SFT did), as plain text where it has none.
"""

from __future__ import annotations

import json
from typing import Any

from engine.contract.grpo import REWARD_ARGUMENTS
from engine.data.rows import ROLES, RowError, content_text
from engine.data.sources import type_name

NOT_COLUMNS = ("prompt",)  # the prompt itself is no column for the rewards


def _messages(value: list[Any]) -> list[dict[str, str]]:
    if not value:
        raise RowError("field 'prompt' is an empty list; give the prompt's messages or its text")
    out = []
    for i, m in enumerate(value):
        where = f"prompt[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{where} must be an object with role and content, got {type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(
                f"{where}: role {role!r} is not one of {', '.join(ROLES)} (tool turns are not supported)"
            )
        if role == "system" and i > 0:
            raise RowError(f"{where}: a system message is only allowed first")
        out.append({"role": str(role), "content": content_text(m.get("content"), where)})
    if out[-1]["role"] != "user":
        raise RowError(
            f"the prompt's last message is the {out[-1]['role']}'s; it must be the user's (the model answers it)"
        )
    if not any(m["content"].strip() for m in out):
        raise RowError("the prompt's messages are all empty")
    return out


def normalise_prompt_row(
    row: dict[str, Any],
) -> tuple[str | None, list[dict[str, str]] | None, dict[str, Any]]:
    """A prompt row as (text prompt, or message prompt, and the other columns)."""
    value = row.get("prompt")
    if isinstance(value, str) and value.lstrip().startswith("[{"):  # a CSV cell holding messages
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # text that happens to start like JSON
    columns = {k: v for k, v in row.items() if k not in NOT_COLUMNS}
    if taken := [k for k in REWARD_ARGUMENTS if k in columns]:
        raise RowError(
            f"column {taken[0]!r} has the name of an argument the reward functions are given themselves "
            f"({', '.join(REWARD_ARGUMENTS)}); rename the column (e.g. to 'row_{taken[0]}')"
        )
    if isinstance(value, str):
        if not value.strip():
            raise RowError("field 'prompt' is empty")
        return value, None, columns
    if isinstance(value, list):
        return None, _messages(value), columns
    raise RowError(f"field 'prompt' must be text or a list of messages, got {type_name(value)}")


def grpo_format_problem(method: str, file_format: str) -> str | None:
    """Why a file of ``file_format`` cannot train ``method`` as far as prompt rows go (None: no objection)."""
    if method == "grpo" and file_format not in ("prompt", "unknown", "mixed"):
        return (
            "method 'grpo' learns from prompts the model answers itself: rows with a prompt (text or messages) "
            "and no completion, plus any columns the rewards read (e.g. answer); the file's rows are in "
            f"{file_format} format"
        )
    if method != "grpo" and file_format == "prompt":
        return (
            f"the file's rows have a prompt and no answer to learn, which is what method 'grpo' trains on (the "
            f"model writes the answers, rewards score them); method '{method}' needs answers in the rows"
        )
    return None


def missing_columns(rows_columns: list[dict[str, Any]], needed: list[str]) -> dict[str, int]:
    """For each needed column, how many rows lack it (absent or null); only columns some row lacks."""
    out = {}
    for name in needed:
        lacking = sum(1 for cols in rows_columns if cols.get(name) is None)
        if lacking:
            out[name] = lacking
    return out


def prompt_token_ids(prompt: str | None, messages: list[dict[str, str]] | None, tokenizer: Any) -> list[int]:
    """The token ids the model generates from: messages through the chat template with the assistant's turn
    opened; a text prompt as one user turn where there is a template, as plain text where there is none."""
    if messages is None and not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(prompt, verbose=False)["input_ids"])
    turns = messages if messages is not None else [{"role": "user", "content": str(prompt)}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 errors, raise_exception() in templates
        raise RowError(f"the model's chat template refused this prompt: {exc}") from exc
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
