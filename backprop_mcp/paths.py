"""Checking the paths and names an agent gives the server.

Agents make path mistakes (a relative path from the wrong folder, a typo, a file in another
user's home). Each check here says what was wrong and what to do. Nothing built from these paths
ever reaches a shell: workers get argv lists and read paths from ``spec.json``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

JOB_ID_RE = re.compile(r"^[a-z]{2,5}-\d{8}-\d{6}-[0-9a-f]{6}$")
# owner/name on the Hugging Face hub (both parts: letters, digits, '-', '_', '.')
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow", ".tsv", ".gz")


def looks_like_hub_name(text: str) -> bool:
    """'owner/name' on the Hugging Face hub, as opposed to a (relative) path like 'data/train.jsonl'."""
    return (
        bool(_HUB_NAME_RE.match(text))
        and not text.startswith((".", "~"))
        and ".." not in text
        and not text.lower().endswith(_DATA_SUFFIXES)
    )


def check_job_id(job_id: str) -> str:
    job_id = job_id.strip()
    if not JOB_ID_RE.match(job_id):
        raise ToolError(
            f"{job_id!r} is not a job id. Job ids look like 'ft-20261128-041200-a1b2c3'; "
            "call list_jobs to see the ids of existing jobs."
        )
    return job_id


def _expand(path: str, what: str) -> Path:
    if not path or not path.strip():
        raise ToolError(f"{what}: the path is empty; give the absolute path of the file.")
    p = Path(os.path.expandvars(path.strip())).expanduser()
    if not p.is_absolute():
        raise ToolError(
            f"{what}: {path!r} is a relative path, and this server's working directory ({Path.cwd()}) is "
            "not the user's. Give an absolute path (e.g. /home/me/data/train.jsonl or ~/data/train.jsonl)."
        )
    return p


def resolve_readable(path: str, what: str, *, allow_dir: bool = True) -> Path:
    """An existing, readable file (or folder) named by an absolute path; symlinks resolved."""
    p = _expand(path, what)
    if not p.exists():
        parent = p.parent
        hint = (
            f" The folder {parent} exists; files there: {', '.join(sorted(x.name for x in parent.iterdir())[:10]) or 'none'}."
            if parent.is_dir() and os.access(parent, os.R_OK)
            else f" The folder {parent} does not exist either."
        )
        raise ToolError(f"{what}: {p} does not exist.{hint} Check the path and try again.")
    resolved = p.resolve()
    if resolved.is_dir():
        if not allow_dir:
            raise ToolError(f"{what}: {p} is a folder; give the path of a file inside it.")
        if not os.access(resolved, os.R_OK | os.X_OK):
            raise ToolError(
                f"{what}: the folder {p} is not readable by this server's user; fix its permissions."
            )
        return resolved
    try:
        with open(resolved, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ToolError(
            f"{what}: {p} cannot be read ({exc.strerror}); fix its permissions or copy it."
        ) from exc
    return resolved


def resolve_under(root: Path, path: str, what: str) -> Path:
    """A path that must stay inside ``root`` after resolving symlinks (outputs, job folders)."""
    p = _expand(path, what)
    resolved = p.resolve()  # follows every symlink that exists, so a link cannot point outside
    root = root.resolve()
    if resolved != root and root not in resolved.parents:
        raise ToolError(
            f"{what}: {p} resolves to {resolved}, outside {root}. Outputs stay under the state folder "
            "(BACKPROP_HOME); give a path inside it or leave the option out to use the default."
        )
    return resolved


def resolve_output_dir(path: str, what: str) -> Path:
    """A folder to write results into (created by the job if missing): absolute, not a file, writable."""
    p = _expand(path, what).resolve()
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if p.exists() and not p.is_dir():
        raise ToolError(f"{what}: {p} is a file; give a folder for the exported files.")
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise ToolError(f"{what}: this server's user cannot write in {existing or p}; choose another folder.")
    return p
