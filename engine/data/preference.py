"""Preference rows in trl's formats: validated, and normalised to one ``Preference`` per row.

Formats (one per file, detected from the keys by ``engine.data.formats``)
    ``preference``           ``{"prompt", "chosen", "rejected"}``: plain texts, or lists of chat messages
                             (the prompt's turns, then each answer's turns, which start with the assistant)
    ``preference_implicit``  ``{"chosen", "rejected"}``: two whole conversations (or texts) that share their
                             start; the shared leading messages (or characters) are the prompt, as trl's
                             ``extract_prompt`` takes it
    ``unpaired_preference``  ``{"prompt", "completion", "label": true|false}``: KTO's answers judged one at a
                             time (a CSV cell may say true/false)

A row whose ``prompt`` is text while its answers are whole conversations takes its prompt from the
conversations (trl's ``maybe_extract_prompt`` does the same: such datasets repeat the question in a column).

What each method makes of them (``engine.data.methods``): dpo and orpo take pairs; kto takes unpaired rows, and a
pair becomes two of them (chosen desirable, rejected undesirable, trl's ``unpair_preference_dataset``);
sft trains on the chosen answers (or the desirable ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.data.rows import ROLES, TOOL_ROLES, RowError, content_text, json_cell
from engine.data.sources import type_name

PREFERENCE_FORMATS = ("preference", "preference_implicit", "unpaired_preference")
Turns = list[dict[str, str]]
Text = str | Turns  # a plain text, or chat messages (role, content)


@dataclass
class Preference:
    """One preference row: a prompt and either two answers (chosen better than rejected) or one judged answer."""

    prompt: Text
    chosen: Text | None = None
    rejected: Text | None = None
    completion: Text | None = None  # unpaired
    label: bool | None = None  # unpaired: the completion is desirable

    @property
    def paired(self) -> bool:
        return self.chosen is not None


def normalise_paired(row: dict[str, Any], explicit_prompt: bool) -> Preference:
    """A ``preference`` (``explicit_prompt``) or ``preference_implicit`` row."""
    chosen = _text_or_turns(row, "chosen")
    rejected = _text_or_turns(row, "rejected")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("'chosen' and 'rejected' must both be texts or both be lists of messages")
    prompt: Text | None = _text_or_turns(row, "prompt") if explicit_prompt else None
    if prompt is None or (isinstance(prompt, str) and not isinstance(chosen, str)):
        prompt, chosen, rejected = _shared_prompt(chosen, rejected)
    elif isinstance(prompt, list) and isinstance(chosen, str):
        raise RowError("'prompt' is a list of messages, so 'chosen' and 'rejected' must be messages too")
    _check_answer(chosen, "chosen")
    _check_answer(rejected, "rejected")
    if chosen == rejected:
        raise RowError(
            "'chosen' and 'rejected' are the same answer: a pair must prefer one answer over another"
        )
    return Preference(prompt=_check_prompt(prompt), chosen=chosen, rejected=rejected)


def normalise_unpaired(row: dict[str, Any]) -> Preference:
    """An ``unpaired_preference`` row: prompt, completion, label."""
    prompt = _text_or_turns(row, "prompt")
    completion = _text_or_turns(row, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise RowError("'prompt' and 'completion' must both be texts or both be lists of messages")
    _check_answer(completion, "completion")
    return Preference(prompt=_check_prompt(prompt), completion=completion, label=_label(row.get("label")))


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # a CSV cell
        return value.strip().lower() == "true"
    if value is None:
        raise RowError("missing field 'label' (true: a desirable completion, false: an undesirable one)")
    raise RowError(f"field 'label' must be true or false, got {type_name(value)} {value!r}"[:200])


def _text_or_turns(row: dict[str, Any], key: str) -> Text:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing field '{key}'")
    if isinstance(value, str) and value.lstrip().startswith("["):  # a CSV cell holding messages as JSON
        value = json_cell(value, key)
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"field '{key}' is empty")
        return value
    if not isinstance(value, list):
        raise RowError(f"field '{key}' must be a text or a list of messages, got {type_name(value)}")
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(value)]


def _message(m: Any, what: str) -> dict[str, str]:
    if not isinstance(m, dict):
        raise RowError(f"{what} must be an object with role and content, got {type_name(m)}")
    role = m.get("role")
    if role in TOOL_ROLES or (role == "assistant" and m.get("tool_calls")):
        raise RowError(f"{what}: tool-calling turns (role '{role}') are not supported; remove the row")
    if role not in ROLES:
        raise RowError(f"{what}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
    if m.get("content") is None:
        raise RowError(f"{what}: missing field 'content'")
    return {"role": role, "content": content_text(m["content"], what)}


def _shared_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """The prompt both answers start with, and each answer after it (trl's ``extract_prompt``)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str):
        if n < len(chosen) and n > 0 and chosen[n - 1] == " ":  # the space belongs to the answers
            n -= 1
        if n == 0:
            raise RowError(
                "'chosen' and 'rejected' share no leading text, so there is no prompt: add a 'prompt'"
            )
    elif n == 0:
        raise RowError(
            "'chosen' and 'rejected' share no leading messages, so there is no prompt: start both with the "
            "same user turn, or add a 'prompt'"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _check_prompt(prompt: Text) -> Text:
    if isinstance(prompt, list):
        if not prompt:
            raise RowError("the prompt has no messages")
        if any(m["role"] == "system" for m in prompt[1:]):
            raise RowError("a system message is only allowed first")
    return prompt


def _check_answer(answer: Text, key: str) -> None:
    if isinstance(answer, str):
        if not answer.strip():
            raise RowError(f"'{key}' is empty after the shared prompt: the two answers must differ")
        return
    if not answer:
        raise RowError(f"'{key}' has no messages after the prompt: the two answers must differ")
    if answer[0]["role"] != "assistant":
        raise RowError(f"'{key}' must start with the assistant's turn (found '{answer[0]['role']}')")
    if not any(m["content"].strip() for m in answer if m["role"] == "assistant"):
        raise RowError(f"'{key}': the assistant turn is empty")
