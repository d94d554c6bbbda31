#!/usr/bin/env python3
"""Where a job's start-up time goes, phase by phase, from the spawn of its worker to its first steps.

Two measurements, the same on the CPU and the GPU:

1. ``imports``: a fresh Python imports, one after another, what a fine-tune's worker imports
   (torch, transformers' model classes, peft, bitsandbytes, Liger's kernels, the engine's recipe), and
   prints the time each one adds (later ones count only what earlier ones did not already import).
2. ``job``: a real job run as the server runs it (``python -P -m engine run <job_dir>``, detached
   like the server's workers, or handed to a warm worker with ``--warm``), with the model and a chat
   dataset from ``server_flow.py``; its event log is read back into phases: the worker's own start-up
   (interpreter, worker module, device lock) up to ``started``, the recipe's imports up to
   ``loading_data``, the dataset, the tokenizer and tokenizing and the defaults, ``from_pretrained``
   with quantization, Liger's patches, LoRA and the fast path, then the first steps one by one (the
   first runs eagerly and compiles the loss kernel, the second captures the CUDA graph).

GPU:  python benchmarks/startup_profile.py --arch qwen2.5-0.5b --steps 4 --json startup.json
CPU:  python benchmarks/startup_profile.py --tiny --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server_flow import write_chat_dataset
from train_speed import ARCHS, ROOT, write_random_model  # puts ROOT on sys.path

from engine.jobs.warm_worker import WARM_IMPORTS

# What a fine-tune's worker imports, in the order it needs them (each timed on its own): the modules the
# warm worker imports ahead of a job, after the worker module itself.
IMPORT_STEPS = [("worker module (pydantic, filelock, spec)", "import engine.jobs.worker")] + [
    (name, f"import {name}") for name in WARM_IMPORTS
]

_IMPORT_PROBE = r"""
import json, sys, time
out = []
for label, stmt in json.loads(sys.argv[1]):
    t0 = time.perf_counter()
    try:
        exec(stmt, {})
        out.append([label, round(time.perf_counter() - t0, 3), None])
    except Exception as exc:  # a package missing here: say so, keep going
        out.append([label, round(time.perf_counter() - t0, 3), f"{type(exc).__name__}: {exc}"[:120]])
print(json.dumps(out))
"""


def time_imports(env: dict[str, str]) -> list[dict[str, Any]]:
    """Each import step's seconds in one fresh interpreter (as the worker's own start pays them)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _IMPORT_PROBE, json.dumps(IMPORT_STEPS)],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"import probe failed:\n{proc.stderr[-2000:]}")
    rows = [{"phase": label, "s": s, "error": err} for label, s, err in json.loads(proc.stdout)]
    return rows + [
        {"phase": "interpreter start + all of the above (wall)", "s": round(wall, 3), "error": None}
    ]


def _phase_name(event: Any) -> str | None:
    """The phase an event closes (None: an event that marks no phase boundary)."""
    kind = event.type
    details = getattr(event, "details", None) or {}
    if kind == "started":
        return "worker start: interpreter, worker module, device lock"
    if kind == "stage":
        return {
            "loading_data": "recipe imports (torch, transformers, ...) and preflight",
            "tokenizing": "dataset read and validated",
            "loading_model": "tokenizer, tokenizing, defaults (CUDA context on a GPU)",
            "training": "LoRA, fast path, evaluator, optimizer set-up",
        }.get(event.name)
    if kind == "log" and "model_source" in details:
        return "from_pretrained (weights, quantization)"
    if kind == "log" and "speedups" in details:
        return "Liger's kernels: import and patch"
    if kind == "log" and "backend" in details:
        return "LoRA adapter and fast path"
    if kind == "progress":
        return f"step {event.step}"
    return None


def phases_from_events(events: list[Any], t_spawn: float) -> list[dict[str, Any]]:
    rows = []
    last = t_spawn
    for e in events:
        name = _phase_name(e)
        if name is None:
            continue
        rows.append({"phase": name, "s": round(e.time - last, 3), "at_s": round(e.time - t_spawn, 3)})
        last = e.time
    return rows


def check_warm_worker(pool: Any) -> dict[str, Any]:
    """What the waiting warm worker holds: its own report (imports, CUDA initialised or not) and whether
    nvidia-smi lists it among the processes with a context on a GPU."""
    import shutil

    warm = pool._warm
    report = json.loads((warm.folder / "ready").read_text())
    check: dict[str, Any] = {
        "pid": warm.proc.pid,
        "imports_s": report.get("seconds"),
        "cuda_initialised": report.get("cuda_initialised"),
        "cuda_initialised_by": report.get("cuda_initialised_by"),
        "skipped": report.get("skipped"),
    }
    if shutil.which("nvidia-smi"):
        apps = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True, text=True,
        ).stdout  # fmt: skip
        check["on_gpu"] = any(line.split(",")[0].strip() == str(warm.proc.pid) for line in apps.splitlines())
        check["gpu_processes"] = apps.strip()
        # in a container nvidia-smi may list no process at all: the card's used memory says it too
        check["gpu_memory_used_mb"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
    return check


def run_job(model_dir: Path, data: Path, steps: int, workdir: Path, env: dict[str, str], warm: bool) -> dict:
    """One fine-tune with the defaults, started as the server starts it; its phases from its events."""
    from engine.contract.events import read_events
    from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings, read_result
    from engine.jobs.runner import create_job, start_worker

    # No kept 4-bit copy: a fresh job and a warm one then differ only in their worker's start.
    spec = FinetuneSpec(
        model=str(model_dir),
        dataset=DatasetSettings(path=str(data)),
        train=TrainSettings(steps=steps),
        keep_quantized=False,
    )
    job_dir = create_job(spec, root=workdir / "jobs")
    t_spawn = time.time()
    ready_s, warm_check = 0.0, None
    if warm:
        from engine.jobs.warm_worker import WarmPool

        pool = WarmPool(Path(env["BACKPROP_HOME"]), env=env)
        pool.keep_warm()
        ready_s = pool.wait_ready(timeout_s=180)
        warm_check = check_warm_worker(pool)
        t_spawn = time.time()
        taken = pool.take(job_dir)
        if taken is None:
            raise RuntimeError("the warm worker was not ready")
        proc = taken[0]
        proc.wait()
        pool.close()
    else:
        proc, _ = start_worker(job_dir)
        proc.wait()
    wall = time.time() - t_spawn
    events, _ = read_events(job_dir / "events.jsonl")
    result = read_result(job_dir)
    first = next((e for e in events if e.type == "progress"), None)
    return {
        "job_dir": str(job_dir),
        "warm": warm,
        "warm_ready_after_s": round(ready_s, 2) if warm else None,
        "warm_check": warm_check,
        "state": result.status if result else None,
        "error": (result.error if result else None) or None,
        "wall_s": round(wall, 2),
        "first_step_done_s": round(first.time - t_spawn, 3) if first else None,
        "phases": phases_from_events(events, t_spawn),
    }


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {title}")
    for r in rows:
        at = f"  (at {r['at_s']:7.3f} s)" if "at_s" in r else ""
        err = f"  [{r['error']}]" if r.get("error") else ""
        print(f"  {r['s']:8.3f} s  {r['phase']}{at}{err}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-0.5b")
    p.add_argument("--tiny", action="store_true", help="CPU: tiny shapes of the architecture")
    p.add_argument("--steps", type=int, default=4, help="the job's steps (default 4)")
    p.add_argument("--rows", type=int, default=None, help="chat rows (1200; --tiny: 96)")
    p.add_argument("--warm", action="store_true", help="also run the job through a warm worker")
    p.add_argument("--skip-imports", action="store_true")
    p.add_argument("--imports-only", action="store_true", help="only the import table (no job)")
    p.add_argument("--workdir", type=str, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="startup-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    os.environ.setdefault("BACKPROP_HOME", str(work / "home"))
    env.setdefault("BACKPROP_HOME", os.environ["BACKPROP_HOME"])
    if args.warm:  # (on a GPU machine the pool keeps one anyway; on the CPU only when asked)
        os.environ.setdefault("BACKPROP_WARM_WORKER", "1")
    out: dict[str, Any] = {"arch": args.arch + (" (tiny)" if args.tiny else "")}
    if not args.skip_imports:
        out["imports"] = time_imports(env)
        print_table("imports in a fresh interpreter, one after another", out["imports"])
    if args.imports_only:
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        return 0
    model_dir = write_random_model(
        args.arch, args.tiny, work / f"model-{args.arch}{'-tiny' if args.tiny else ''}"
    )
    rows = args.rows or (96 if args.tiny else 1200)
    data = work / f"chat-{rows}.jsonl"
    if not data.exists():
        write_chat_dataset(data, model_dir, rows, 66 if args.tiny else 264, 260 if args.tiny else 1041)
    out["jobs"] = []
    for warm in [False, True] if args.warm else [False]:
        job = run_job(model_dir, data, args.steps, work, env, warm)
        out["jobs"].append(job)
        label = "warm worker" if warm else "fresh worker"
        print_table(f"job phases ({label}; {job['state']}, first step done {job['first_step_done_s']} s "
                    f"after the spawn, job {job['wall_s']} s)", job["phases"])  # fmt: skip
        if job["error"]:
            print(f"  error: {job['error']}")
        if job.get("warm_check"):
            print(f"  the warm worker while it waited: {job['warm_check']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0 if all(j["state"] == "succeeded" for j in out["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
