"""Small file helpers shared by the engine and the server (standard library only)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_into(src: str | Path, folder: str | Path) -> Path:
    """Move a finished file into ``folder`` so that it appears whole or not at all.

    Across file systems a move is a copy: it goes to a hidden ``.partial`` name first and is
    renamed into place, so a crash mid-copy never leaves a half-written file under the real name.
    """
    src, folder = Path(src), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / src.name
    tmp = folder / f".{src.name}.partial"
    try:
        shutil.move(src, tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


def write_dir_atomically(dst: str | Path, write: Callable[[Path], object]) -> Path:
    """Fill a temporary folder beside ``dst`` with ``write(tmp)``, then swap it into place.

    Readers, and a job resumed after a crash, see the old folder or the new one, never half of one
    (the old folder is renamed aside before the new one is renamed in).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    old = dst.with_name(f".{dst.name}.old")
    try:
        write(tmp)
        if dst.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return dst


def backprop_home() -> Path:
    """The state folder: ``$BACKPROP_HOME``, else the user's data dir (platformdirs)."""
    env = os.environ.get("BACKPROP_HOME")
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_data_dir

    return Path(user_data_dir("backprop-mcp", appauthor=False)).resolve()
