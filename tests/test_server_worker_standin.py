"""A stand-in for the engine worker process, for the server's tests (it is not a mock of server code).

The server's job machinery (spawning, reattaching, tailing, cancelling, killing) is exercised
against a real detached process that keeps the worker's side of the job-folder contract the way
``engine.jobs.worker`` does — the same typed events through the same ``EventWriter``, the same device file lock under
``$BACKPROP_HOME/locks``, ``queued`` while waiting for it, ``cancel.request`` honoured between
steps, ``result.json`` then ``finished`` at the end — but trains nothing, so each test takes a
second instead of loading torch. End-to-end tests with the real worker are in
``test_server_e2e.py``.

    python tests/test_server_worker_standin.py [--steps N] [--step-s S] [--ignore-cancel] [--completions]
        <job_dir>

``--completions``: each step adds a line to the job folder's completions.jsonl, as a GRPO job does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    from filelock import FileLock, Timeout

    from engine.contract import events as ev
    from engine.contract.events import EventWriter
    from engine.contract.grpo import COMPLETIONS_FILE
    from engine.contract.spec import CANCEL_FILE, EVENTS_FILE, JobResult, write_result

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step-s", type=float, default=0.1)
    parser.add_argument("--ignore-cancel", action="store_true")
    parser.add_argument("--save-s", type=float, default=0.0, help="time spent saving after the last step")
    parser.add_argument("--completions", action="store_true", help="write completions.jsonl as GRPO does")
    parser.add_argument("job_dir")
    args = parser.parse_args(argv)
    job_dir = Path(args.job_dir)
    spec = json.loads((job_dir / "spec.json").read_text())
    events = EventWriter(job_dir / EVENTS_FILE)

    def cancelled() -> bool:
        return not args.ignore_cancel and (job_dir / CANCEL_FILE).exists()

    def finish(status: str, **extra: object) -> int:
        result = JobResult(status=status, kind=spec["kind"], **extra)  # type: ignore[arg-type]
        write_result(job_dir, result)
        events.emit(ev.Finished(status=status, artifacts=result.artifacts))
        return {"succeeded": 0, "cancelled": 2}.get(status, 1)

    locks = Path(os.environ["BACKPROP_HOME"]) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(locks / "cpu.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        events.emit(ev.Queued(message="waiting for cpu (another job is training on it)"))
        while True:
            if cancelled():
                return finish("cancelled", error={"type": "Cancelled", "message": "cancelled while queued"})
            try:
                lock.acquire(timeout=0.1)
                break
            except Timeout:
                continue
    events.emit(ev.Started(kind=spec["kind"], pid=os.getpid()))
    events.log("stand-in worker", parent_pid=os.getppid())
    events.stage("training", total_steps=args.steps)
    history = []
    for step in range(1, args.steps + 1):
        time.sleep(args.step_s)
        loss = 2.0 / step
        history.append({"step": step, "loss": loss})
        if args.completions:
            with (job_dir / COMPLETIONS_FILE).open("a", encoding="utf-8") as samples:
                samples.write(json.dumps({"step": step, "completion": "yes.", "reward": 1.0}) + "\n")
        events.emit(
            ev.Progress(
                step=step, total=args.steps, loss=loss, lr=1e-4, eta_s=(args.steps - step) * args.step_s
            )
        )
        if cancelled():
            return finish("cancelled", error={"type": "Cancelled", "message": f"cancelled at step {step}"})
    time.sleep(args.save_s)
    adapter = job_dir / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text("{}")
    return finish(
        "succeeded",
        metrics={"final_loss": history[-1]["loss"], "steps": args.steps},
        artifacts={"adapter": str(adapter)},
        loss_history=history,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
