"""The user's own reward: a function in a Python file, loaded and called in the job's worker.

The file runs with the worker's rights, so who may name one is decided before a job exists: the CLI
and the Python API always (the user runs their own code), an MCP tool only under the server's reward
code policy (backprop_mcp.reward_policy). Here, every failure (the file will not load, the function is
missing, it raises, it returns the wrong thing) becomes a ``RewardCodeError`` naming the file and the
line, which fails the job with that message. That includes ``sys.exit()`` and any other exception that
is not an ``Exception``; a ``KeyboardInterrupt`` alone passes through, since the worker reads it as a
stop (a cancel), wherever it arrives.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from engine.rewards.builtin import RewardFn


class RewardCodeError(RuntimeError):
    """The user's reward file failed: the message names the file, the line and what went wrong."""


def _line_in(path: Path, tb: TracebackType | None) -> int | None:
    """The line of the innermost frame of ``tb`` that runs in ``path``."""
    line = None
    for frame in traceback.extract_tb(tb):
        if Path(frame.filename).resolve() == path:
            line = frame.lineno
    return line


def _where(path: Path, exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"{path}:{exc.lineno}"
    line = _line_in(path, exc.__traceback__)
    return f"{path}:{line}" if line is not None else str(path)


def _load_module(path: Path) -> ModuleType:
    name = f"backprop_reward_{abs(hash(str(path))):x}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardCodeError(f"{path}: not a Python file that can be loaded (give a .py file)")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        del sys.modules[name]
        raise  # a stop of the job (the worker's cancel), not the file's failure
    except BaseException as exc:  # noqa: BLE001 - sys.exit() in the file fails the job with its line too
        del sys.modules[name]
        raise RewardCodeError(
            f"{_where(path, exc)}: the reward file failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def load_reward_function(path: str | Path, function: str = "reward") -> RewardFn:
    """The function ``function`` of the file at ``path``, wrapped so that its failures name the file."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise RewardCodeError(f"{file}: reward file not found (give the path of a .py file)")
    module = _load_module(file)
    fn = getattr(module, function, None)
    if not callable(fn):
        defined = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise RewardCodeError(
            f"{file}: has no function {function!r} (it defines: {', '.join(defined) or 'none'}); write "
            f"def {function}(prompts, completions, **columns) -> list[float]"
        )

    def call(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        try:
            values = fn(prompts, completions, **columns)
        except KeyboardInterrupt:
            raise  # a stop of the job (the worker's cancel), not the function's failure
        except BaseException as exc:  # noqa: BLE001 - sys.exit() in the function: its line too
            raise RewardCodeError(
                f"{_where(file, exc)}: the reward function {function!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        return checked_values(values, len(completions), f"{file}: the reward function {function!r}")

    call.__name__ = function
    return call


def checked_values(values: Any, expected: int, who: str) -> list[float | None]:
    """``values`` as a list of floats and Nones, one per completion, or an error saying what came back."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardCodeError(
            f"{who} returned {type(values).__name__}; return a list with one number per completion"
        )
    if len(values) != expected:
        raise RewardCodeError(
            f"{who} returned {len(values)} rewards for {expected} completions; return one per completion"
        )
    out: list[float | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise RewardCodeError(
                f"{who} returned {v!r} (a {type(v).__name__}) at position {i}; rewards must be numbers or None"
            ) from None
        out.append(None if math.isnan(number) else number)
    return out
