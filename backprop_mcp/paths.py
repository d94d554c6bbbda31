"""Checking the paths and names an agent gives the server.

Agents make path mistakes (a relative path from the wrong folder, a typo, a file in another
user's home), and a steered agent may try worse. Each check here says what was wrong and what to
do; every path goes through the file policy (``policy.py``) and a type check (``engine.contract.files``)
before anything opens it. Nothing built from these paths ever reaches a shell: workers get argv
lists and read paths from ``spec.json``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

from backprop_mcp.policy import FilePolicy, current_policy, is_key_file
from engine.interface import PathError, looks_like_path, missing_message, path_kind, quoted, user_path

JOB_ID_RE = re.compile(r"^[a-z]{2,5}-\d{8}-\d{6}-[0-9a-f]{6}$")
# owner/name on the Hugging Face hub (both parts: letters, digits, '-', '_', '.')
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


def looks_like_hub_name(text: str) -> bool:
    """'owner/name' on the Hugging Face hub, as opposed to a (relative) path like 'data/train.jsonl'."""
    return bool(_HUB_NAME_RE.match(text)) and not looks_like_path(text) and ".." not in text


def check_job_id(job_id: str) -> str:
    job_id = job_id.strip()
    if not JOB_ID_RE.match(job_id):
        raise ToolError(
            f"{quoted(job_id, 80)} is not a job id. Job ids look like 'ft-20261128-041200-a1b2c3'; "
            "call list_jobs to see the ids of existing jobs."
        )
    return job_id


def _expand(path: str, what: str) -> Path:
    """The user's path as typed (plain ``~`` only, no environment variables); absolute or refused."""
    try:
        p = user_path(path, what)
    except PathError as exc:
        raise ToolError(str(exc)) from None
    if not p.is_absolute():
        raise ToolError(
            f"{what}: {quoted(path)} is a relative path, and this server's working directory is not the "
            "user's. Give an absolute path (e.g. /home/me/data/train.jsonl or ~/data/train.jsonl)."
        )
    return p


def _missing_hint(p: Path, policy: FilePolicy) -> str:
    """What is next to a missing path, named only when its folder is inside the allowed area."""
    parent = p.parent
    if not policy.may_list(parent):
        return ""
    try:
        if path_kind(parent, "folder") != "dir":
            return f" The folder {quoted(parent)} does not exist either."
        names = sorted(x.name for x in parent.iterdir() if not is_key_file(x.name))
    except (PathError, OSError):
        return ""
    shown = ", ".join(quoted(n, 60) for n in names[:10]) or "none"
    return f" The folder {quoted(parent)} exists; files there: {shown}."


def resolve_readable(path: str, what: str, *, allow_dir: bool = True) -> Path:
    """An existing, readable file (or folder) named by an absolute path, inside the file policy.

    The policy is checked first (so an error never tells whether a refused path exists), then the
    path's type, from one ``stat``: nothing is opened, so a FIFO or a device cannot block the call.
    """
    p = _expand(path, what)
    policy = current_policy()
    resolved = policy.check(p, what)
    try:
        kind = path_kind(resolved, what)
    except PathError as exc:
        raise ToolError(str(exc)) from None
    if kind is None:
        raise ToolError(f"{missing_message(p, what)}{_missing_hint(p, policy)} Check the path and try again.")
    if kind == "dir":
        if not allow_dir:
            raise ToolError(f"{what}: {quoted(p)} is a folder; give the path of a file inside it.")
        if not os.access(resolved, os.R_OK | os.X_OK):
            raise ToolError(
                f"{what}: the folder {quoted(p)} is not readable by this server's user; fix its permissions."
            )
        return resolved
    if not os.access(resolved, os.R_OK):
        raise ToolError(
            f"{what}: {quoted(p)} cannot be read by this server's user; fix its permissions or copy it."
        )
    return resolved


def resolve_writable_dir(path: str, what: str) -> Path:
    """A folder to write into (an ``output_dir``), inside the file policy: existing, or new in an existing folder."""
    p = _expand(path, what)
    policy = current_policy()
    resolved = policy.check(p, what)
    try:
        kind = path_kind(resolved, what)
        parent = path_kind(resolved.parent, what) if kind is None else "dir"
    except PathError as exc:
        raise ToolError(str(exc)) from None
    if kind == "file":
        raise ToolError(f"{what}: {quoted(p)} is a file; give a folder to write into.")
    if parent != "dir":
        raise ToolError(
            f"{what}: the folder {quoted(p.parent)} does not exist; create it first or choose an existing folder."
        )
    if not os.access(resolved if kind else resolved.parent, os.W_OK | os.X_OK):
        raise ToolError(f"{what}: {quoted(p)} is not writable by this server's user; choose another folder.")
    return resolved
