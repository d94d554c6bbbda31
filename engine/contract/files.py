"""Small file helpers shared by the engine, the CLI and the server (standard library only).

Also the one check of a user-given path (by type, before anything opens it) and the one way to
quote user input in a message (at most ``QUOTE_LIMIT`` characters).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from platformdirs import user_data_dir


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path, folder: bool = False) -> None:
    """Give a mkstemp/mkdtemp result (0600/0700) the mode a plain open()/mkdir() would have: files
    we write into a user's folder (an exported GGUF, a Modelfile) must be as readable as theirs."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


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
        as_if_created(tmp)
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
        as_if_created(tmp, folder=True)
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
    return Path(user_data_dir("backprop-mcp", appauthor=False)).resolve()


# ---------------------------------------------------------------------------------------------
# User-given paths and text in messages

QUOTE_LIMIT = 200  # characters of any user input that an error message repeats


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as a quoted, one-line string of at most ``limit`` of its characters.

    Every message that echoes user input goes through here, so a 100 kB path or a prompt full of
    control characters never comes back whole (repr escapes NUL, newlines and the like).
    """
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


class PathError(ValueError):
    """A user-given path that cannot be used; the message says why and what to do instead."""


class MissingPathError(PathError):
    """Nothing exists at a user-given path."""


_SPECIAL_TYPES = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def user_path(text: str | os.PathLike[str], what: str) -> Path:
    """The path a user typed: stripped, a leading plain ``~`` expanded, nothing else.

    Environment variables (``$HOME``, ``${VAR}``) are never expanded and ``~name`` (another
    user's home) is refused: a path means what it says, and a variable's value never ends up in
    an error message.
    """
    raw = os.fspath(text)
    if not isinstance(raw, str):
        raise PathError(f"{what}: expected a path as text, got {type(raw).__name__}")
    s = raw.strip()
    if not s:
        raise PathError(f"{what}: the path is empty; give the path of the file or folder.")
    if "\x00" in s:
        raise PathError(f"{what}: {quoted(s)} contains a NUL character, which no file name can hold.")
    if s == "~" or s.startswith("~/"):
        s = str(Path.home()) + s[1:]
    elif s.startswith("~"):
        raise PathError(
            f"{what}: {quoted(s)} starts with '~name'; only '~' (your own home folder) is expanded. "
            "Write the full path instead."
        )
    return Path(s)


def path_kind(path: Path, what: str) -> str | None:
    """``"file"``, ``"dir"`` or ``None`` (nothing there), from one ``stat`` and before anything opens it.

    FIFOs, sockets and devices are refused (opening or reading one can block for ever), and every
    ``OSError`` (a name over 255 bytes, a symlink loop, no permission) becomes a ``PathError``.
    """
    try:
        st = os.stat(path)  # follows symlinks: a link to a FIFO is a FIFO
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PathError(_os_error_message(path, what, exc)) from exc
    except ValueError as exc:  # embedded NUL from a caller that skipped user_path
        raise PathError(f"{what}: {quoted(path)} is not a valid path ({exc}).") from exc
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    kind = next((name for test, name in _SPECIAL_TYPES if test(st.st_mode)), "not a regular file")
    raise PathError(
        f"{what}: {quoted(path)} is {kind}, not a regular file or folder; reading it could block for ever. "
        "Give a regular file (or a folder)."
    )


def checked_path(text: str | os.PathLike[str], what: str, *, expect: str = "any") -> Path:
    """An existing file (``expect="file"``), folder (``"dir"``) or either, checked by type; symlinks resolved.

    Raises ``MissingPathError`` when nothing is there and ``PathError`` for everything else that
    makes the path unusable. Nothing is opened.
    """
    p = user_path(text, what)
    kind = path_kind(p, what)
    if kind is None:
        raise MissingPathError(missing_message(p, what))
    if expect == "file" and kind == "dir":
        raise PathError(f"{what}: {quoted(p)} is a folder; give the path of a file inside it.")
    if expect == "dir" and kind == "file":
        raise PathError(f"{what}: {quoted(p)} is a file; give the path of a folder.")
    try:
        return p.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
        raise PathError(f"{what}: {quoted(p)} cannot be resolved ({exc}).") from exc


# Data files a dataset argument names (a hub name never ends so).
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".tsv", ".arrow", ".gz")


def looks_like_path(text: str) -> bool:
    """Written as a path on this machine, never a hub name (hub names are ``owner/name``)."""
    return (
        text.startswith((".", "/", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", text))  # a Windows drive
        or text.count("/") > 1
        or "\\" in text
        or text.lower().endswith(DATA_SUFFIXES)
    )


def local_or_name(text: str | os.PathLike[str]) -> str:
    """The absolute path when ``text`` names an existing file or folder, else ``text`` unchanged.

    For entry points that accept "a path or a hub name" (CLI, Python API): it never raises, and an
    unusable path (a FIFO, a name too long) is left for the loader's own check to explain.
    """
    try:
        p = user_path(text, "path")
        return str(p.resolve()) if path_kind(p, "path") else os.fspath(text)
    except (PathError, OSError, RuntimeError):
        return os.fspath(text)


def missing_message(path: Path, what: str) -> str:
    hint = ""
    if "$" in str(path):
        hint = " Environment variables such as $HOME are not expanded: write the path out in full."
    return f"{what}: {quoted(path)} does not exist.{hint}"


def _os_error_message(path: Path, what: str, exc: OSError) -> str:
    if exc.errno == errno.ENAMETOOLONG:
        return (
            f"{what}: the path is too long ({len(str(path))} characters; a name between two slashes may have "
            f"at most 255 bytes, a whole path 4096): {quoted(path)}. Use a shorter path."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what}: {quoted(path)} is not accessible to this process's user; fix its permissions or copy it."
    if exc.errno == errno.ELOOP:
        return f"{what}: {quoted(path)} is a loop of symbolic links; point it at a real file."
    return f"{what}: {quoted(path)} cannot be used ({exc.strerror or type(exc).__name__})."
