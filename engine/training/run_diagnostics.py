"""Where a run's GPU memory and time go in its first steps, written to files for the benchmarks.

``BACKPROP_MEMORY_HISTORY=<file.pickle>``: torch's allocator history (every allocation with its Python
stack) over the run's first step (its first ``BACKPROP_MEMORY_HISTORY_STEPS``), written as torch's snapshot, beside a ``.json`` with what was allocated
before the recording began (the weights, the adapter); ``benchmarks/memory_at_peak.py`` lists what was
alive at the peak, by the code that allocated it.

``BACKPROP_STEP_PROFILE=<file.txt>``: torch's profiler over the run's second step (the first warms up):
its operations by GPU time and by host time, as text tables (host time only off a GPU).

The engine's loop and the benchmarks' baselines (trl's trainers, through a callback) record the same way.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

HISTORY_ENV = "BACKPROP_MEMORY_HISTORY"
HISTORY_STEPS_ENV = "BACKPROP_MEMORY_HISTORY_STEPS"  # more steps than HISTORY_STEPS (their warm-up longer)
PROFILE_ENV = "BACKPROP_STEP_PROFILE"
# One step: the benchmarks time from their second step on, so the recording's cost (a Python stack for
# every allocation) stays out of their figures; Adam's moments, made at the first step's end, are what
# later steps add to its peak.
HISTORY_STEPS = 1
PROFILE_STEP = 2  # after one step of warm-up (compiled kernels, cuBLAS handles, allocator pools)
MAX_ENTRIES = 2_000_000  # allocator events kept (older ones drop out)
TABLE_ROWS = 30


def environment_recording(
    folder: str | None, name: str, profile: bool = False, steps: int = HISTORY_STEPS
) -> dict[str, str]:
    """This process's environment for a child run that, with a ``folder``, records its memory over its
    first ``steps`` into ``folder/name.pickle`` and, with ``profile``, its second step into
    ``folder/name.profile.txt``."""
    env = dict(os.environ)
    if folder:
        env[HISTORY_ENV] = str(Path(folder) / f"{name}.pickle")
        env[HISTORY_STEPS_ENV] = str(steps)
        if profile:
            env[PROFILE_ENV] = str(Path(folder) / f"{name}.profile.txt")
    return env


class RunDiagnostics:
    """What one run records (nothing without the variables above; no memory history off a GPU)."""

    def __init__(self, device: str):
        self.on_gpu = on_gpu = device.startswith("cuda")
        history, profile = os.environ.get(HISTORY_ENV), os.environ.get(PROFILE_ENV)
        self.history = Path(history) if history and on_gpu else None
        self.profile_path = Path(profile) if profile else None
        self.profiler: Any = None
        self.history_steps = int(os.environ.get(HISTORY_STEPS_ENV) or HISTORY_STEPS)
        if self.history is None:
            return
        torch.cuda.synchronize(device)
        self.before = {
            "allocated_before_bytes": torch.cuda.memory_allocated(device),
            "peak_before_reset_bytes": torch.cuda.max_memory_allocated(device),
        }
        # the stacks of allocations only (not of frees): half the cost, all that memory_at_peak reads
        torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, context="alloc", stacks="python")

    def before_step(self, steps_done: int) -> None:
        """Before each step (``steps_done`` so far): the profiler starts before ``PROFILE_STEP``."""
        if self.profile_path is not None and self.profiler is None and steps_done == PROFILE_STEP - 1:
            from torch.profiler import ProfilerActivity, profile

            self._sync()
            gpu = [ProfilerActivity.CUDA] if self.on_gpu else []
            self.profiler = profile(activities=[ProfilerActivity.CPU, *gpu])
            self.profiler.__enter__()
            self.t0 = time.perf_counter()

    def after_step(self, steps_done: int) -> None:
        """After each step: the memory snapshot after ``history_steps``, the profile after ``PROFILE_STEP``."""
        if self.history is not None and steps_done >= self.history_steps:
            self._write_history(self.history, steps_done)
            self.history = None
        if self.profiler is not None and steps_done == PROFILE_STEP:
            self._sync()
            wall = time.perf_counter() - self.t0
            self.profiler.__exit__(None, None, None)
            self._write_profile(self.profiler, wall)
            self.profiler = self.profile_path = None

    def _sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def _write_history(self, path: Path, steps: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        info = {**self.before, "steps": steps, "peak_bytes": torch.cuda.max_memory_allocated()}
        path.with_suffix(".json").write_text(json.dumps(info, indent=2))

    def _write_profile(self, prof: Any, wall_s: float) -> None:
        assert self.profile_path is not None
        self.profile_path.parent.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        text = [f"step {PROFILE_STEP}: {wall_s:.4f} s by the clock"]
        if self.on_gpu:
            text += ["by GPU time:", events.table(sort_by="self_device_time_total", row_limit=TABLE_ROWS)]
        text += ["by host time:", events.table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)]
        self.profile_path.write_text("\n".join(text))
