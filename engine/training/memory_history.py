"""Where a run's GPU memory goes: torch's allocator history over its first steps, written to a file.

Set ``BACKPROP_MEMORY_HISTORY`` to a file name and a run on a GPU records every allocation (with its
Python stack) from its first step, and writes torch's snapshot after ``HISTORY_STEPS`` steps, beside a
``.json`` with what was allocated before the recording began (the weights, the adapter).
``benchmarks/memory_at_peak.py`` reads the pair back and lists what was alive at the peak, by the code that
allocated it. For the benchmarks: the engine's runs and the baselines' (trl's, through a callback) are
recorded the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

HISTORY_ENV = "BACKPROP_MEMORY_HISTORY"
# One step: the benchmarks time from their second step on, so the recording's cost (a Python stack for
# every allocation) stays out of their figures; Adam's moments, made at the first step's end, are what
# later steps add to its peak.
HISTORY_STEPS = 1
MAX_ENTRIES = 2_000_000  # allocator events kept (older ones drop out)


def environment_recording(folder: str | None, name: str) -> dict[str, str]:
    """This process's environment for a child run that, with a ``folder``, records into ``folder/name.pickle``."""
    if not folder:
        return dict(os.environ)
    return dict(os.environ, **{HISTORY_ENV: str(Path(folder) / f"{name}.pickle")})


class MemoryHistory:
    """The recording of one run (nothing off a GPU, or without ``HISTORY_ENV``)."""

    def __init__(self, device: str):
        target = os.environ.get(HISTORY_ENV)
        self.path = Path(target) if target and device.startswith("cuda") else None
        if self.path is None:
            return
        torch.cuda.synchronize(device)
        self.before = {
            "allocated_before_bytes": torch.cuda.memory_allocated(device),
            "peak_before_reset_bytes": torch.cuda.max_memory_allocated(device),
        }
        torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")

    def step_done(self, steps: int) -> None:
        """After each step: at ``HISTORY_STEPS``, write the snapshot and stop recording."""
        if self.path is None or steps < HISTORY_STEPS:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(self.path))
        torch.cuda.memory._record_memory_history(enabled=None)
        info = {**self.before, "steps": steps, "peak_bytes": torch.cuda.max_memory_allocated()}
        self.path.with_suffix(".json").write_text(json.dumps(info, indent=2))
        self.path = None
