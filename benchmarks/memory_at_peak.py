#!/usr/bin/env python3
"""What was alive on the GPU at a run's peak, by the code that allocated it.

Reads the allocator histories that ``BACKPROP_MEMORY_HISTORY`` (engine.training.run_diagnostics) makes the
engine's runs and the benchmarks' baselines write (``preference_speed.py`` / ``grpo_speed.py``
``--memory-history DIR``): torch's snapshot ``NAME.pickle`` and ``NAME.json`` beside it. Replays the
allocations and frees of the recorded steps, finds the moment the allocated total was highest, and lists
the blocks alive then, grouped by the innermost frame in a library that matters here (the engine, trl,
peft, transformers, Liger, bitsandbytes, Unsloth, torch's autograd/checkpointing) with the frame of the
engine or the benchmark that led there. What was allocated before the recording began (weights, adapter,
optimizer state made earlier) is one row.

    python benchmarks/memory_at_peak.py results/.../memory/*.pickle [--top 20]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LIBRARIES = ("/engine/", "/trl/", "/peft/", "/transformers/", "/liger_kernel/", "/bitsandbytes/", "/unsloth")
TORCH_PARTS = ("/torch/utils/checkpoint.py", "/torch/autograd/", "/torch/optim/", "/torch/_dynamo/")
CALLERS = ("/engine/", "/benchmarks/", "/trl/trainer/")
BEFORE = "(allocated before the recording began)"


def where(frames: list[dict[str, Any]]) -> str:
    """The innermost frame in a library that matters, and the innermost engine/benchmark/trainer frame above it."""

    def short(f: dict[str, Any]) -> str:
        name = str(f.get("filename", "?"))
        for mark in (*LIBRARIES, "/torch/"):
            if mark in name:
                name = mark.strip("/") + "/" + name.split(mark, 1)[1]
                break
        return f"{name}:{f.get('line')} {f.get('name')}"

    inner = next(
        (f for f in frames if any(m in str(f.get("filename")) for m in LIBRARIES + TORCH_PARTS)), None
    )
    if inner is None:
        return short(frames[0]) if frames else "(no Python frame)"
    rest = frames[frames.index(inner) + 1 :]
    caller = next((f for f in rest if any(m in str(f.get("filename")) for m in CALLERS)), None)
    return short(inner) + (f"  <- {short(caller)}" if caller is not None and caller is not inner else "")


def live_at_peak(trace: list[dict[str, Any]], before: int) -> tuple[int, dict[str, int]]:
    """(peak allocated bytes, bytes alive at the peak by ``where``), replaying ``trace`` from ``before``
    bytes already allocated. A block freed during the trace but allocated before it comes off ``before``."""
    total = peak = before
    peak_at = -1
    live: dict[int, int] = {}
    for i, event in enumerate(trace):
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size", 0))
        if action == "alloc":
            live[addr] = size
            total += size
        elif action == "free_requested":
            total -= live.pop(addr, size)
        if total > peak:
            peak, peak_at = total, i
    groups: dict[str, int] = defaultdict(int)
    alive: dict[int, dict[str, Any]] = {}
    before_left = before
    for event in trace[: peak_at + 1]:
        if event.get("action") == "alloc":
            alive[event["addr"]] = event
        elif event.get("action") == "free_requested" and alive.pop(event.get("addr"), None) is None:
            before_left -= int(event.get("size", 0))
    for event in alive.values():
        groups[where(event.get("frames") or [])] += int(event["size"])
    groups[BEFORE] += before_left
    return peak, dict(groups)


def report(path: Path, top: int) -> str:
    snapshot = pickle.loads(path.read_bytes())
    info = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    trace = max(snapshot.get("device_traces", [[]]), key=len)
    peak, groups = live_at_peak(trace, int(info.get("allocated_before_bytes", 0)))
    gib = 2**30
    lines = [
        f"== {path.stem}: peak {peak / gib:.3f} GiB over {info.get('steps', '?')} steps "
        f"(the run's own max_memory_allocated: {info.get('peak_bytes', 0) / gib:.3f} GiB; "
        f"{len(trace)} allocator events)"
    ]
    for name, size in sorted(groups.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {size / gib:8.3f} GiB  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("snapshots", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    for path in args.snapshots:
        print(report(path, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
