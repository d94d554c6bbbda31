"""Calling the engine's one-shot commands, which need torch, from the torch-free server.

``python -m engine check-data -`` and ``python -m engine generate -`` read their JSON arguments on
stdin (never one huge argv item: Linux caps one at 128 KiB, and a long non-ASCII prompt escaped
as JSON passes that) and each print one JSON object on stdout (``{"ok": false, "error": {...}}``
on failure). They run as subprocesses with a hard time limit, so a slow model load can never hang
a tool call past the client's patience.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from pydantic_core import to_jsonable_python

from engine.interface import engine_command, worker_env


class EngineCallError(RuntimeError):
    pass


def call_engine(command: str, args: dict[str, Any], *, timeout_s: float, home: Any = None) -> dict[str, Any]:
    """Run one engine one-shot command; returns its JSON object (``ok`` is True) or raises."""
    argv = [*engine_command(), command, "-"]
    try:
        done = subprocess.run(  # noqa: S603 - argv list, no shell
            argv,
            input=json.dumps(to_jsonable_python(args)).encode("utf-8"),  # (settings may be models: rewards)
            capture_output=True,
            timeout=timeout_s,
            env=worker_env(home),
            cwd=home,  # like a worker: a relative name never resolves against the server's folder
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EngineCallError(
            f"the engine took longer than {timeout_s:.0f} s (loading a large model on this machine is slow); "
            "try a smaller model, or run it from the command line: backprop " + command
        ) from exc
    lines = [line for line in done.stdout.decode("utf-8", "replace").splitlines() if line.strip()]
    try:
        payload = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        stderr = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise EngineCallError(
            f"the engine command '{command}' failed (exit code {done.returncode}) without a result: "
            + (" | ".join(stderr) or "no output")
        )
    if not payload.get("ok", False):
        error = payload.get("error") or {}
        raise EngineCallError(f"{error.get('type', 'Error')}: {error.get('message', 'unknown error')}")
    return payload
