"""Which files the server may read or write: one policy for every path a tool is given.

An agent drives this server, and an agent can be steered by what it reads, so a path argument is
never trusted just because the process could open it. The allowed area is, in order:

1. the client's roots (MCP ``roots/list``), when the client declares the capability and lists at
   least one ``file://`` root;
2. else the folders in ``BACKPROP_ALLOWED_DIRS`` (separated by ``os.pathsep``);
3. else everything except system folders (``/etc``, ``/proc``, ``/sys``, ``/dev`` ...).

The server's own state folder is always allowed. Credential locations (``~/.ssh``, ``~/.aws``,
``~/.gnupg`` ...) and key files (``id_rsa``, ``*.pem`` ...) are refused in every mode, and so are
system folders unless the user listed a folder inside one explicitly (a root or an allowed dir).
Paths are compared after resolving symlinks, so a link cannot lead out of the area.

Roots reach a tool through ``ClientRoots``, a parameter the SDK fills with a resolver before the
tool body runs: on 2025-11-25 the server sends ``roots/list`` once per connection and forgets the
answer on ``notifications/roots/list_changed``; on 2026-07-28 (no sessions, no list_changed) the
SDK asks within the call (``InputRequiredResult``). The resolver puts the policy of the call in a
context variable that ``current_policy()`` reads in the tool's worker thread.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.resolve import ListRoots, Resolve
from mcp.shared.message import ServerMessageMetadata
from mcp.types import ListRootsRequest, ListRootsResult, NotificationParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from engine.interface import backprop_home, quoted

log = logging.getLogger("backprop_mcp")

ALLOWED_DIRS_ENV = "BACKPROP_ALLOWED_DIRS"
ROOTS_TIMEOUT_S = 5.0  # a client that declares roots but never answers must not hold the call
_ROOTS_KEY = "backprop_mcp.roots"  # in the connection's scratch state (2025-11-25)

# Pseudo-files, devices, system configuration and service state: never a dataset or a model.
SYSTEM_DIRS = (
    "/etc", "/proc", "/sys", "/dev", "/boot", "/run", "/var/run", "/var/log", "/var/lib", "/var/spool",
    "/var/mail", "/root",  # /root: unless it is the user's home
    "/lost+found",
    "/private/etc", "/private/var/run", "/private/var/log", "/private/var/db",  # macOS resolves /etc here
)  # fmt: skip
# Under the user's home: where credentials live.
CREDENTIAL_DIRS = (
    ".ssh", ".aws", ".gnupg", ".config/gcloud", ".kube", ".docker", ".azure", ".config/gh", ".password-store",
    ".local/share/keyrings", ".pki", ".cache/huggingface/token", ".cache/huggingface/stored_tokens",
    ".huggingface/token", ".netrc", ".git-credentials", ".pgpass", ".pypirc", ".npmrc",
)  # fmt: skip
# Key and secret files by name, anywhere.
KEY_FILE_PATTERNS = (
    "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "*.pem", "*.key", "*.p12", "*.pfx", "*.kdbx",
    ".env", ".env.*", ".netrc", ".pgpass", ".git-credentials",
)  # fmt: skip


def _real(path: Path | str) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def is_key_file(name: str) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern) for pattern in KEY_FILE_PATTERNS)


def _listed(folders: Iterable[Path], limit: int = 8) -> str:
    shown = [str(f) for f in folders]
    more = f" and {len(shown) - limit} more" if len(shown) > limit else ""
    return ", ".join(quoted(f, 120) for f in shown[:limit]) + more


def allowed_dirs_from_env(value: str | None) -> tuple[Path, ...] | None:
    """The folders of ``BACKPROP_ALLOWED_DIRS`` (absolute, symlinks resolved); None when unset."""
    if not value or not value.strip():
        return None
    folders = []
    for part in value.split(os.pathsep):
        part = part.strip()
        if part == "~" or part.startswith("~/"):
            part = str(Path.home()) + part[1:]
        if part and os.path.isabs(part):
            folders.append(_real(part))
        elif part:
            log.warning("%s: ignoring %s, not an absolute path", ALLOWED_DIRS_ENV, quoted(part))
    return tuple(folders)


def roots_to_folders(result: ListRootsResult | None) -> tuple[Path, ...] | None:
    """The ``file://`` roots of a ``roots/list`` answer as folders; None when there are none."""
    if result is None:
        return None
    folders = []
    for root in result.roots:
        url = urlparse(str(root.uri))
        if url.scheme != "file":
            continue
        path = unquote(url.path)
        if path and "\x00" not in path and os.path.isabs(path):
            folders.append(_real(path))
    return tuple(folders) or None


@dataclass(frozen=True)
class FilePolicy:
    """The area one tool call may read and write (see the module docstring)."""

    state_home: Path
    roots: tuple[Path, ...] | None = None
    env_dirs: tuple[Path, ...] | None = None
    home: Path | None = None

    @classmethod
    def build(cls, state_home: Path | None = None, roots: tuple[Path, ...] | None = None) -> FilePolicy:
        return cls(
            state_home=_real(state_home or backprop_home()),
            roots=roots,
            env_dirs=allowed_dirs_from_env(os.environ.get(ALLOWED_DIRS_ENV)),
            home=_real(Path.home()),
        )

    @property
    def source(self) -> str:
        return "roots" if self.roots else "env" if self.env_dirs else "default"

    @property
    def folders(self) -> tuple[Path, ...]:
        """The allowed folders in roots/env mode, the state folder first; empty in default mode."""
        chosen = self.roots or self.env_dirs
        return (self.state_home, *chosen) if chosen else ()

    def _denied_areas(self) -> list[tuple[Path, str]]:
        areas = [
            (_real(d), "a system folder")
            for d in SYSTEM_DIRS
            if not (d == "/root" and self.home is not None and _inside(self.home, _real(d)))
        ]
        if self.home is not None:
            areas += [(_real(self.home / d), "where credentials are kept") for d in CREDENTIAL_DIRS]
        return areas

    def problem(self, resolved: Path) -> str | None:
        """Why ``resolved`` (absolute, symlinks resolved) is refused, or None when it is allowed."""
        if is_key_file(resolved.name):
            return (
                f"{quoted(resolved.name, 80)} looks like a key or credentials file; this server never reads "
                "or writes those"
            )
        if _inside(resolved, self.state_home):
            return None
        chosen = self.roots or self.env_dirs
        container = next((f for f in chosen if _inside(resolved, f)), None) if chosen else None
        if chosen and container is None:
            return "it is outside the folders this server may use"
        for area, why in self._denied_areas():
            # A root or allowed dir inside a denied area is the user's explicit choice.
            if _inside(resolved, area) and not (container is not None and _inside(container, area)):
                return f"it is in {area}, {why}; this server does not read or write there"
        return None

    def how_to_allow(self) -> str:
        if self.source == "roots":
            return (
                f"Allowed: {_listed(self.folders)} (the client's roots and the server's state folder). To use "
                "another folder, add it to the client's roots (its workspace or allowed folders), or copy the "
                "file into one of these."
            )
        if self.source == "env":
            return (
                f"Allowed: {_listed(self.folders)} ({ALLOWED_DIRS_ENV} and the server's state folder). To allow "
                f"another folder, add it to {ALLOWED_DIRS_ENV} in the server's configuration (folders separated "
                f"by {os.pathsep!r}) and restart the server, or copy the file into one of these."
            )
        return (
            "Allowed: any folder except system folders (/etc, /proc, /sys, /dev, ...) and credential "
            "locations (~/.ssh, ~/.aws, ...). Copy the file to a folder of your own (e.g. ~/data), or list "
            f"its folder in {ALLOWED_DIRS_ENV} in the server's configuration to allow it explicitly."
        )

    def check(self, path: Path, what: str) -> Path:
        """``path`` with symlinks resolved, or a ToolError saying why it is refused and how to allow it."""
        resolved = _real(path)
        why = self.problem(resolved)
        if why is not None:
            shown = quoted(path) if str(path) == str(resolved) else f"{quoted(path)} (-> {quoted(resolved)})"
            raise ToolError(f"{what}: {shown} is refused: {why}. {self.how_to_allow()}")
        return resolved

    def may_list(self, folder: Path) -> bool:
        """Whether an error may name the files of ``folder``: only inside the allowed area."""
        return self.problem(_real(folder)) is None


_ACTIVE: ContextVar[FilePolicy | None] = ContextVar("backprop_file_policy", default=None)


def current_policy() -> FilePolicy:
    """The policy of the tool call being served (set by ``ClientRoots``), else one from the environment."""
    return _ACTIVE.get() or FilePolicy.build()


# -- roots, through the SDK's resolver injection -----------------------------------------------------


def _connection_state(ctx: Context) -> dict[str, Any] | None:
    """The connection's scratch dict (2025-11-25 sessions); None when the protocol has no sessions."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return None
    connection = getattr(ctx.session, "_connection", None)
    state = getattr(connection, "state", None)
    return state if isinstance(state, dict) else None


async def _listed_roots(ctx: Context) -> ListRootsResult | ListRoots | None:
    caps = ctx.client_capabilities
    if caps is None or caps.roots is None:
        return None
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return ListRoots()  # the SDK asks within the call (InputRequiredResult) and injects the answer
    cache = _connection_state(ctx)
    if cache is not None and _ROOTS_KEY in cache:
        return cache[_ROOTS_KEY]
    result: ListRootsResult | None = None
    try:
        with anyio.fail_after(ROOTS_TIMEOUT_S):
            result = await ctx.session.send_request(
                ListRootsRequest(),
                ListRootsResult,
                metadata=ServerMessageMetadata(related_request_id=ctx.request_id),
            )
    except Exception as exc:  # a client that declares roots but fails to list them: fall back, say so
        log.warning("roots/list failed (%s); using %s or the default policy", exc, ALLOWED_DIRS_ENV)
    if cache is not None:
        cache[_ROOTS_KEY] = result
    return result


async def client_roots(
    ctx: Context, listed: Annotated[ListRootsResult | None, Resolve(_listed_roots)]
) -> FilePolicy:
    state_home = getattr(ctx.request_context.lifespan_context, "home", None)
    policy = FilePolicy.build(state_home, roots_to_folders(listed))
    _ACTIVE.set(policy)  # the tool body runs in this context (a worker thread gets a copy)
    return policy


ClientRoots = Annotated[FilePolicy, Resolve(client_roots)]
"""A tool parameter that applies the client's roots to the call (the tool body may ignore it)."""


async def on_roots_list_changed(ctx: Any, _params: NotificationParams) -> None:
    """``notifications/roots/list_changed`` (2025-11-25): ask again on the next call."""
    connection = getattr(ctx.session, "_connection", None)
    state = getattr(connection, "state", None)
    if isinstance(state, dict):
        state.pop(_ROOTS_KEY, None)


def listen_for_roots_changes(server: Any) -> None:
    server._lowlevel_server.add_notification_handler(
        "notifications/roots/list_changed", NotificationParams, on_roots_list_changed
    )
