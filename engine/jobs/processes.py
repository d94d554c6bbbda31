"""Every platform-specific process call the server makes, in one place.

Workers run detached from the server (their own session on POSIX, their own process group and no
console on Windows), so a client that restarts the server does not kill training. A worker is
identified by its pid *and* its start time: pids are reused, so a pid alone could make a new
server "reattach" to an unrelated process, or kill one.

Cancellation does not rely on signals: the supervisor first asks the worker to stop by creating
``cancel.request`` in the job folder; only a worker that ignores it past a timeout is killed here
(SIGKILL on POSIX, TerminateProcess on Windows, both through psutil).

Untested here: the Windows branches (CI has no Windows runner). They use only documented
``subprocess`` creation flags and psutil calls that exist on Windows.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

# psutil is imported where it is used: a server with no unfinished job never needs it, and its
# import is a measurable part of the cold start an MCP client waits for.

# psutil derives a start time on Linux from the boot time, which /proc/stat gives in whole seconds,
# plus jiffies: compared with a wall-clock reading (the store's created_at) it can be off by up to
# a second, never by more for the same process.
START_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: float  # seconds since the epoch, as psutil.Process.create_time() reports it


def _detach_kwargs() -> dict[str, object]:
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}


def spawn_detached(
    argv: list[str],
    *,
    cwd: Path,
    stderr_path: Path,
    env: dict[str, str] | None = None,
    stdin_pipe: bool = False,
) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    """Start ``argv`` (a list, never a shell string) detached, stdout discarded, stderr to a file.

    stdout goes to DEVNULL so a worker can never write into the MCP stdio stream. ``stdin_pipe``: the
    child reads from a pipe the caller writes (a warm worker waits there for its job).
    Returns the Popen (the caller reaps it if it outlives the child) and the child's identity.
    """
    with open(stderr_path, "ab") as stderr:
        proc = subprocess.Popen(  # noqa: S603 - argv is a list built by the server, no shell
            argv,
            cwd=str(cwd),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            close_fds=True,
            env=env,
            **_detach_kwargs(),  # type: ignore[call-overload]
        )
    start = process_start_time(proc.pid)
    if start is None:
        # The child already exited (and was not reaped yet on Windows): identity by pid only
        # for the moment; is_alive() will report it dead either way.
        start = 0.0
    return proc, ProcessIdentity(proc.pid, start)


def process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


def _same_process(identity: ProcessIdentity) -> psutil.Process | None:
    """The live process that ``identity`` names, or None (gone, a zombie, or a reused pid)."""
    import psutil

    try:
        proc = psutil.Process(identity.pid)
        if abs(proc.create_time() - identity.start_time) > START_TIME_TOLERANCE_S:
            return None  # the pid now belongs to another process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None  # exited, waiting for its parent to reap it
        return proc
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        # Another user's process with this pid cannot be our worker.
        return None


def is_alive(identity: ProcessIdentity) -> bool:
    return _same_process(identity) is not None


def kill_tree(identity: ProcessIdentity) -> bool:
    """Kill the worker and its children at once. Returns False if it was already gone."""
    import psutil

    proc = _same_process(identity)
    if proc is None:
        return False
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    for p in [proc, *children]:
        try:
            p.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
        except psutil.Error:
            pass
    psutil.wait_procs([proc, *children], timeout=5)
    return True
