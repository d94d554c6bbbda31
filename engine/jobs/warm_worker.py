"""A worker process kept warm by the server: the training stack imported before a job is asked for.

A fine-tune's worker spends its first seconds importing torch, transformers, peft, bitsandbytes and
Liger's kernels (``benchmarks/startup_profile.py`` measures it). The server keeps one such process
started ahead (``WarmPool``) and hands it the next job, so those seconds are paid before the user asks.
What a job's worker promises stays as it was:

- **one job per process**: a warm worker runs exactly one job (``python -P -m engine run`` would run
  the same ``run_job``), then exits; the pool starts the next one;
- **detached and restart-proof**: it is started in its own session like every worker; the job comes
  on its standard input, which it reads once, and from then on the server can die without touching it
  (its standard input is closed, its output discarded, its errors go to the job's ``worker.log``);
  a warm worker that never got a job ends when the server does (end of file on its standard input);
- **nothing on the GPU while it waits**: the imports initialise no CUDA context (bitsandbytes' question
  about the cards' compute capability is answered by NVML: ``capabilities_from_nvml``) and take no device
  lock (``run_job`` takes the job's lock, as any worker does); it is handed a job only once its
  imports are done (its ``ready`` file), else the job gets a fresh worker;
- **nothing without an NVIDIA GPU**: no warm worker unless NVML sees a GPU (``BACKPROP_WARM_WORKER``:
  ``0`` never, ``1`` also without a GPU, which the tests use); one that dies is replaced, and after
  three that die before their imports finish the pool stops trying and jobs start fresh workers.

Its cost while it waits is host memory (the imported libraries, under 1 GiB) and nothing else.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.contract.spec import WORKER_LOG
from engine.hardware import gpus
from engine.jobs import processes as procs
from engine.jobs.runner import worker_command, worker_env
from engine.jobs.worker import run_job
from engine.models.presets import privacy_environment

log = logging.getLogger(__name__)

WARM_ENV = "BACKPROP_WARM_WORKER"
READY_FILE = "ready"
WARM_LOG = "warm.log"
# A replacement waits this long before importing, so that it does not compete for the CPU with the
# start of the job that the last warm worker was just handed.
REPLACEMENT_DELAY_S = 20.0
MAX_EARLY_DEATHS = 3

# What a fine-tune's worker imports, heaviest first; each is optional (a missing extra is skipped).
# torch._dynamo / _inductor and triton are what the compiled loss kernel loads on its first call.
WARM_IMPORTS = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.llama.modeling_llama",
    "peft",
    "bitsandbytes",
    "liger_kernel.transformers",
    # its patch functions (apply_liger_kernel_to_qwen2, ...) are lazy attributes: the first lookup imports
    # this module and every model module it patches (0.37-0.41 s on the CPU machine), inside the job
    "liger_kernel.transformers.monkey_patch",
    "torch._dynamo",
    "torch._inductor.compile_fx",
    "engine.recipes.finetune",
    "engine.recipes.series",
    "engine.training.loop",
    "engine.training.varlen_attention",
)


# -- in the warm process --------------------------------------------------------------------------


def warm_imports() -> dict[str, object]:
    """Import the training stack without touching a GPU; what it imported, skipped, and took, and the
    first import after which a CUDA context existed (None: none did)."""
    privacy_environment()  # before anything imports huggingface_hub (as run_job does)
    t0 = time.perf_counter()
    done, skipped, cuda_initialised_by = [], [], None
    with capabilities_from_nvml():
        for name in WARM_IMPORTS:
            try:
                importlib.import_module(name)
                done.append(name)
            except Exception as exc:  # an optional extra missing or broken: the job will say so itself
                skipped.append(f"{name}: {type(exc).__name__}: {str(exc)[:160]}")
            if cuda_initialised_by is None and _cuda_initialised():
                cuda_initialised_by = name
    return {
        "imported": done,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 3),
        "cuda_initialised": _cuda_initialised(),
        "cuda_initialised_by": cuda_initialised_by,
    }


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@contextlib.contextmanager
def capabilities_from_nvml() -> Iterator[None]:
    """While the warm worker imports, NVML answers ``torch.cuda.get_device_capability``.

    bitsandbytes asks torch for every card's compute capability when it is imported (peft imports it),
    to pick its native library, and torch answers by creating a CUDA context: on the H100 the warm
    worker held one while it waited (seen 2026-12-07). NVML gives the same answer without a context.
    Only where the answer cannot depend on the device asked about: every card NVML sees has one
    capability (else torch answers, and the ready report names the import that made a context)."""
    torch = _import_torch()
    capabilities = {g.compute_capability for g in gpus.probe_gpus().gpus}
    if torch is None or len(capabilities) != 1 or None in capabilities:
        yield
        return
    major, minor = (int(part) for part in str(capabilities.pop()).split("."))
    asked = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: (major, minor)
    try:
        yield
    finally:
        torch.cuda.get_device_capability = asked


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:  # no training extra: nothing to warm
        return None
    return torch


def _become_job_worker(job_dir: Path) -> None:
    """Detach from the server's pipe and write errors where a job's worker writes them."""
    sys.stderr.flush()
    fd = os.open(job_dir / WORKER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(job_dir)


def serve(warm_dir: str | Path, delay_s: float = 0.0) -> int:
    """The warm process: import, say ready, wait for one job on stdin, run it (``python -m engine warm``).

    Standard input is read on a thread from the start, so that the end of the server (end of file)
    ends this process at once, during its delay or its imports too.
    """
    warm_dir = Path(warm_dir)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(sys.stdin.readline()), daemon=True).start()

    def server_gone(wait_s: float) -> bool:
        try:
            line = lines.get(timeout=wait_s) if wait_s > 0 else lines.get_nowait()
        except queue.Empty:
            return False
        lines.put(line)  # (a job cannot come before ``ready``; keep whatever came for below)
        return not line.strip()

    if server_gone(delay_s):
        shutil.rmtree(warm_dir, ignore_errors=True)
        return 0
    report = warm_imports()
    gc.collect()  # the imports' garbage goes while nothing waits; run_recipe freezes what they made
    report |= {"pid": os.getpid(), "ready_at": time.time()}
    print(f"warm worker {os.getpid()}: {json.dumps(report)}", file=sys.stderr, flush=True)
    tmp = warm_dir / f"{READY_FILE}.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, warm_dir / READY_FILE)
    line = lines.get()  # blocks until the server hands over a job, or goes away (end of file)
    if not line.strip():
        shutil.rmtree(warm_dir, ignore_errors=True)
        return 0
    job_dir = Path(json.loads(line)["job_dir"]).resolve()
    _become_job_worker(job_dir)
    shutil.rmtree(warm_dir, ignore_errors=True)
    waited = round(time.time() - report["ready_at"], 1)  # type: ignore[operator]
    note = (
        f"worker kept warm by the server: its imports took {report['seconds']} s before the job came "
        f"(ready {waited} s earlier)"
    )
    return run_job(job_dir, notes=[note])


# -- in the server ----------------------------------------------------------------------------------


def warm_command() -> list[str] | None:
    """The argv prefix of a warm worker: the job worker's command with ``warm`` for ``run``."""
    argv = worker_command()
    return [*argv[:-1], "warm"] if argv[-1] == "run" else None


def warm_wanted() -> tuple[bool, str]:
    """Whether a server should keep a warm worker, and why (``BACKPROP_WARM_WORKER``, else a GPU)."""
    choice = os.environ.get(WARM_ENV, "").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False, f"{WARM_ENV}={choice}"
    if choice in ("1", "true", "yes", "on"):
        return True, f"{WARM_ENV}={choice}"
    if warm_command() is None:
        return False, "BACKPROP_WORKER_COMMAND does not end with 'run'"
    probe = gpus.probe_gpus()  # NVML, torch-free
    return probe.available, "an NVIDIA GPU is present" if probe.available else f"no GPU ({probe.reason})"


class _Warm:
    def __init__(self, proc: subprocess.Popen[bytes], identity: procs.ProcessIdentity, folder: Path):
        self.proc, self.identity, self.folder = proc, identity, folder

    def ready(self) -> bool:
        return self.proc.poll() is None and (self.folder / READY_FILE).is_file()


class WarmPool:
    """One warm worker, kept by a server process (thread-safe); ``take`` hands it a job."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None):
        self.root = home / "warm"
        self._env = env or worker_env(home)
        self._lock = threading.Lock()
        self._warm: _Warm | None = None
        self._early_deaths = 0
        self._next_delay_s = 0.0  # after a hand-over: the replacement waits (REPLACEMENT_DELAY_S)
        self._wanted: bool | None = None
        self.reason = ""

    def wanted(self) -> bool:
        if self._wanted is None:
            self._wanted, self.reason = warm_wanted()
            log.info("warm worker: %s (%s)", "kept" if self._wanted else "none", self.reason)
        return self._wanted

    def keep_warm(self) -> None:
        """Start a warm worker when none is alive (a dead one is replaced; the server's watcher calls
        this every poll, so the replacement for one handed a job starts within a poll)."""
        if not self.wanted():
            return
        with self._lock:
            warm = self._warm
            if warm is not None and warm.proc.poll() is None:
                return
            if warm is not None:  # it died without a job
                if not (warm.folder / READY_FILE).is_file():
                    self._early_deaths += 1
                shutil.rmtree(warm.folder, ignore_errors=True)
                self._warm = None
            if self._early_deaths >= MAX_EARLY_DEATHS:
                if self._early_deaths == MAX_EARLY_DEATHS:
                    self._early_deaths += 1
                    log.warning("warm worker: %d died before their imports finished; not starting more "
                                "(see %s)", MAX_EARLY_DEATHS, self.root)  # fmt: skip
                return
            self._warm = self._spawn(self._next_delay_s)
            self._next_delay_s = 0.0

    def _spawn(self, delay_s: float) -> _Warm | None:
        command = warm_command()
        if command is None:
            return None
        folder = self.root / f"w-{secrets.token_hex(4)}"
        folder.mkdir(parents=True)
        try:
            proc, identity = procs.spawn_detached(
                [*command, str(folder), str(delay_s)], cwd=folder, stderr_path=folder / WARM_LOG,
                env=self._env, stdin_pipe=True,
            )  # fmt: skip
        except OSError as exc:
            log.warning("warm worker: could not start one: %s", exc)
            shutil.rmtree(folder, ignore_errors=True)
            self._early_deaths += 1
            return None
        return _Warm(proc, identity, folder)

    def take(self, job_dir: Path) -> tuple[subprocess.Popen[bytes], procs.ProcessIdentity] | None:
        """Hand ``job_dir`` to the warm worker if one is ready (else None: start a fresh worker). Its
        replacement comes with the next ``keep_warm``, after a delay."""
        with self._lock:
            warm = self._warm
            if warm is None or not warm.ready():
                return None
            self._warm = None
            self._next_delay_s = REPLACEMENT_DELAY_S
            try:
                assert warm.proc.stdin is not None
                warm.proc.stdin.write((json.dumps({"job_dir": str(job_dir)}) + "\n").encode())
                warm.proc.stdin.close()
            except OSError:  # it died just now: the caller starts a fresh worker
                shutil.rmtree(warm.folder, ignore_errors=True)  # its ``ready`` file must not outlive it
                return None
        return warm.proc, warm.identity

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until the warm worker is ready (benchmarks; raises TimeoutError)."""
        t0 = time.monotonic()
        while True:
            with self._lock:
                warm = self._warm
            if warm is not None and warm.ready():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"no warm worker ready within {timeout_s:.0f} s (see {self.root})")
            time.sleep(0.05)

    def close(self) -> None:
        """End the waiting warm worker (it reads end of file and exits)."""
        with self._lock:
            warm, self._warm = self._warm, None
        if warm is None:
            return
        with contextlib.suppress(OSError):
            if warm.proc.stdin is not None:
                warm.proc.stdin.close()
        try:
            warm.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            procs.kill_tree(warm.identity)
            warm.proc.wait()
        shutil.rmtree(warm.folder, ignore_errors=True)
