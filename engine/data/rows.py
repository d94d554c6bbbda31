"""What every row format shares: the error a bad row raises, the chat roles, and reading one field.

``engine.data.formats`` (supervised formats) and ``engine.data.preference`` (preference formats) both
validate rows with these, so a field is read and refused the same way in every format.
"""

from __future__ import annotations

import json
from typing import Any

from engine.data.sources import type_name

ROLES = ("system", "user", "assistant")
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")


class RowError(Exception):
    """Raised while normalising one row; the reader turns it into a RowProblem with the row's place."""


def text_field(row: dict[str, Any], key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type_name(value)}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def content_text(content: Any, what: str) -> str:
    """Message content: a string, or OpenAI-style text parts joined together."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RowError(f"{what}: only text content is supported (found a '{part.get('type')}' part)")
            texts.append(part["text"])
        return "".join(texts)
    raise RowError(f"{what}: content must be a string, got {type_name(content)}")


def json_cell(value: Any, key: str) -> Any:
    """A field as given, or, for a CSV cell (always text), the JSON list it holds."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"field '{key}' is text but not a JSON list of messages ({e.msg})") from None
    return value
