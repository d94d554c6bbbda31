"""No tool answers with a bare "Error executing tool X": every exception becomes a clear tool error.

The SDK hides any exception other than ``ToolError`` behind "Error executing tool <name>", so the
model learns nothing and retries blindly. ``guard_tools`` wraps every registered tool once: the
engine's refusals (a missing extra, a failed preflight), whose messages already say what to do,
become ``ToolError``s as they are; an unexpected exception becomes a ``ToolError`` naming its type
and a short message (input quoted at most ``QUOTE_LIMIT`` characters), and its traceback goes to
the server log (stderr).

Arguments that do not match a tool's schema never reach the tool: the SDK answers pydantic's listing
of every problem, each with a link to pydantic's documentation; a call with many bad settings
(start_finetune takes over sixty) answered thousands of characters, most of them links. The middleware
``compact_argument_errors`` drops the links and keeps the first problems within ``MAX_ERROR_CHARS``,
saying how many more there are.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel

from engine.interface import MissingExtra, PreflightError, quoted

log = logging.getLogger("backprop_mcp")

_GUARDED = "__backprop_guarded__"
_PASS_THROUGH = (ToolError, ResourceError, MCPError)  # already clear, or a protocol error for the SDK
_REFUSALS = (MissingExtra, PreflightError)  # the engine's own refusals: their message is the answer
MAX_ERROR_CHARS = 4000  # an argument-error answer (tests/test_fuzz.py holds every answer to 6000)
_DOCS_LINK = re.compile(r"\n +For further information visit https://errors\.pydantic\.dev\S*")
_LISTING = re.compile(r"\d+ validation errors? for \w+\n")  # pydantic's header, then one problem a line pair


def _tool_error(tool: str, exc: Exception) -> ToolError:
    return ToolError(str(exc)) if isinstance(exc, _REFUSALS) else unexpected_error(tool, exc)


def unexpected_error(tool: str, exc: BaseException) -> ToolError:
    """The ToolError a model sees for an exception nobody anticipated (traceback logged here)."""
    log.error("tool %s failed unexpectedly", tool, exc_info=exc)
    detail = quoted(str(exc)) if str(exc) else "no message"
    if isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror  # errno text only: the file name may be the caller's whole input
    return ToolError(
        f"{tool} failed with an unexpected {type(exc).__name__}: {detail}. The server did not foresee this "
        "(its traceback is in the server's log): check the arguments and try again, and report it if it "
        "happens with valid ones."
    )


def guard(tool: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with unexpected exceptions turned into ``unexpected_error`` (sync and async alike)."""
    if getattr(fn, _GUARDED, False):
        return fn
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def guarded_async(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise _tool_error(tool, exc) from exc

        wrapper: Callable[..., Any] = guarded_async
    else:

        @functools.wraps(fn)
        def guarded_sync(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except _PASS_THROUGH:
                raise
            except Exception as exc:
                raise _tool_error(tool, exc) from exc

        wrapper = guarded_sync
    setattr(wrapper, _GUARDED, True)
    return wrapper


def guard_tools(server: MCPServer) -> None:
    """Wrap every tool registered so far. Call it once all tools are registered.

    The tool's schema and argument handling were built from the original function at
    registration, so only the function that runs changes.
    """
    for tool in server._tool_manager.list_tools():
        tool.fn = guard(tool.name, tool.fn)


async def compact_argument_errors(ctx: Any, call_next: Any) -> Any:
    """Middleware: a tools/call error answer's text through ``compact``."""
    result = await call_next(ctx)
    if getattr(ctx, "method", None) != "tools/call":
        return result
    if isinstance(result, BaseModel):  # handlers may answer models; the runner sends this wire form
        result = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    if not isinstance(result, dict) or not result.get("isError"):
        return result
    content = [
        {**c, "text": compact(c["text"])} if c.get("type") == "text" and isinstance(c.get("text"), str) else c
        for c in result.get("content") or []
    ]
    return {**result, "content": content}


def compact(text: str) -> str:
    """``text`` without pydantic's documentation links; a listing longer than ``MAX_ERROR_CHARS`` is cut
    after the last whole problem that fits, and says how many were left out."""
    text = _DOCS_LINK.sub("", text)
    listing = _LISTING.search(text)
    if listing is None or len(text) <= MAX_ERROR_CHARS:
        return text
    head = text[: listing.end()]
    problems = re.split(r"\n(?=\S)", text[listing.end() :])  # each starts with its field's name, unindented
    kept: list[str] = []
    for problem in problems:
        if len(head) + sum(len(p) + 1 for p in kept) + len(problem) > MAX_ERROR_CHARS - 100:
            break
        kept.append(problem)
    left_out = len(problems) - len(kept)
    return head + "\n".join(kept) + f"\n({left_out} more not shown: fix these and call again)"
