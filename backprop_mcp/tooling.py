"""How the tools are declared: annotation hints, and argument bounds taken from the job spec models."""

from __future__ import annotations

from typing import Any

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from backprop_mcp.limits import MAX_NAME_CHARS, MAX_PATH_CHARS
from engine.interface import setting_home


def setting(name: str, model: type[BaseModel] | None = None) -> Any:
    """A tool argument's bounds and description, taken from the job spec's field (one source of truth):
    ``model``'s field ``name``, or where the flat setting ``name`` lives (``engine.contract.spec.setting_home``).

    Defaults stay in the tool's signature, where the SDK reads them; a test checks they equal the spec's.
    """
    source = model.model_fields[name] if model else setting_home(name)[2]
    field = Field(description=source.description)
    field.metadata = list(source.metadata)
    return field


def path_arg(description: str | None = None) -> Any:
    """A path (or a model or dataset name, which can be a path) argument: bounded, described."""
    return Field(max_length=MAX_PATH_CHARS, description=description)


def name_arg(description: str | None = None) -> Any:
    """A job id or a short name (a model in Ollama): bounded, described."""
    return Field(max_length=MAX_NAME_CHARS, description=description)


def hints(*, read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )
