#!/usr/bin/env python3
"""What a user gets: the whole flow through the real MCP server with default settings, timed.

The server runs as clients run it (``python -m backprop_mcp`` over stdio, driven by the ``mcp``
SDK's client): ``inspect_gpu`` -> ``check_dataset`` -> ``start_finetune`` (only the dataset and the
model given) -> ``job_status`` until the job ends. The model is a random-weight folder of a real
architecture (``train_speed.write_random_model``, with its tokenizer); the data is a chat dataset
(JSONL ``messages``) whose templated lengths are log-normal, median ~264 and 99th percentile ~1,041
tokens under that tokenizer, cut from real English text.

Printed: the defaults the job chose (with their reasons), tokens/s as the job reports it
(non-padding tokens over the timed steps, i.e. after ``--warmup`` steps; and the job's own
whole-run figure), peak GPU memory, any out-of-memory back-off, and wall time. With
``--compare-fixed`` it then runs train_speed.py's engine fixed-length measurement (``--fixed-seq``
tokens a row, micro-batch ``--fixed-batch``) on the same model in the same run and prints
flow / fixed (issue 9 goal 4: >= 0.9).

GPU:  python benchmarks/server_flow.py --arch qwen2.5-0.5b --compare-fixed --json flow.json
CPU smoke test (tiny shapes, a few steps):  python benchmarks/server_flow.py --tiny --compare-fixed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from train_speed import ARCHS, ROOT, run_engine, write_random_model, write_tokens  # puts ROOT on sys.path

TERMINAL = ("succeeded", "failed", "cancelled")


def log(*msg: object) -> None:
    print("[server_flow]", *msg, file=sys.stderr, flush=True)


def write_chat_dataset(path: Path, model_dir: Path, rows: int, median: int, p99: int, seed: int = 0) -> dict:
    """Chat rows (one user turn, one assistant reply) with log-normal templated token lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    sigma = math.log(p99 / median) / 2.3263  # z of the 99th percentile
    text = (ROOT / "engine" / "assets" / "tiny_corpus.txt").read_text()
    corpus = tok(text, add_special_tokens=False)["input_ids"]

    def length(messages: list[dict]) -> int:
        rendered = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(rendered, add_special_tokens=False)["input_ids"])

    def cut(n: int) -> str:  # n tokens of the corpus from a random place, wrapping around
        start = rng.randrange(len(corpus))
        ids = [corpus[(start + i) % len(corpus)] for i in range(n)]
        return tok.decode(ids).strip()

    overhead = length([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])
    lengths = []
    with open(path, "w") as f:
        for _ in range(rows):
            body = max(8, round(rng.lognormvariate(math.log(median), sigma)) - overhead)
            n_user = max(2, round(body * rng.uniform(0.1, 0.4)))
            messages = [
                {"role": "user", "content": cut(n_user)},
                {"role": "assistant", "content": cut(body - n_user)},
            ]
            lengths.append(length(messages))
            f.write(json.dumps({"messages": messages}) + "\n")
    lengths.sort()
    return {
        "rows": rows,
        "tokens": sum(lengths),
        "median": lengths[rows // 2],
        "p99": lengths[min(rows - 1, math.ceil(0.99 * rows) - 1)],
        "max": lengths[-1],
    }


async def wait_for_warm_worker(home: Path, limit_s: float) -> float | None:
    """Seconds until the server's warm worker is ready (engine.jobs.warm_worker's ``ready`` file), or
    None when none is ready within ``limit_s`` (no GPU, or turned off)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if any((home / "warm").glob("*/ready")):
            return round(time.perf_counter() - t0, 2)
        await anyio.sleep(0.1)
    return None


async def user_flow(
    model_dir: Path, data: Path, home: Path, steps: int | None, wait_warm_s: float = 0.0
) -> dict[str, Any]:
    env = {
        **os.environ,
        "BACKPROP_HOME": str(home),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "backprop_mcp"], env=env, cwd=str(ROOT)
    )
    t0 = time.perf_counter()
    async with Client(params, mode="legacy") as client:

        async def call(tool: str, arguments: dict) -> dict:
            result = await client.call_tool(tool, arguments)
            if result.is_error:
                raise RuntimeError(f"{tool} failed: {result.content}")
            log(f"{tool} answered at {time.perf_counter() - t0:.1f} s")
            return result.structured_content

        gpu = await call("inspect_gpu", {})
        check = await call("check_dataset", {"path": str(data), "model": str(model_dir)})
        warm_wait = await wait_for_warm_worker(home, wait_warm_s) if wait_warm_s > 0 else None
        started = await call(
            "start_finetune",
            {"dataset_path": str(data), "model": str(model_dir)} | ({"steps": steps} if steps else {}),
        )
        t_start, t_answer = time.perf_counter(), time.time()  # the events' clock is time.time()
        status = {"state": started["state"]}
        while status["state"] not in TERMINAL:
            status = await call("job_status", {"job_id": started["job_id"], "wait_s": 40})
        t_end = time.perf_counter()
    return {
        "gpu": gpu.get("summary"),
        "check": {k: check.get(k) for k in ("tokens", "defaults", "reasons", "memory_estimate_gib", "fits")},
        "status": status,
        "job_dir": started["job_dir"],
        "job_wall_s": round(t_end - t_start, 1),
        "flow_wall_s": round(t_end - t0, 1),
        "answered_at": t_answer,
        "warm_wait_s": warm_wait,
    }


def summarise(flow: dict[str, Any], warmup: int) -> dict[str, Any]:
    """The numbers a user sees, from the job's status and its events (as train_speed.run_engine reads them)."""
    from engine.contract.events import read_events

    status = flow["status"]
    metrics = status.get("metrics") or {}
    events, _ = read_events(Path(flow["job_dir"]) / "events.jsonl")
    chosen = {
        e.details["setting"]: (e.details.get("value"), e.message)
        for e in events
        if e.type == "log" and "setting" in e.details
    }
    progress = [e for e in events if e.type == "progress"]
    timed = progress[warmup:] or progress
    tokens = sum(p.tokens or 0 for p in timed)
    secs = sum(p.step_s or 0.0 for p in timed)
    # by the clock, from the end of the last untimed step: also counts what happens between steps
    # (checkpoints, GPU monitoring, event writes)
    clock = timed[-1].time - progress[warmup - 1].time if 0 < warmup < len(progress) else None
    answered = flow["answered_at"]
    first = progress[0].time - answered if progress else None
    started = next((e.time - answered for e in events if e.type == "started"), None)
    training = next((e.time - answered for e in events if e.type == "stage" and e.name == "training"), None)
    ended = next((e.time - answered for e in events if e.type == "finished"), None)
    all_tokens = sum(p.tokens or 0 for p in progress)
    step_rate = tokens / secs if secs else None
    warm_note = next((e.message for e in events if e.type == "log" and "kept warm" in e.message), None)
    # where the loop's own time goes (from the training stage to the last step)
    at_step = {p.step: p.time for p in progress}
    checkpoints = [e for e in events if e.type == "checkpoint"]
    loop = {
        "loop_s": round(progress[-1].time - (training + answered), 3) if progress and training else None,
        "steps_s": round(sum(p.step_s or 0.0 for p in progress), 3),
        "first_two_steps_s": [p.step_s for p in progress[:2]],
        "checkpoints": len(checkpoints),
        "checkpoint_s": round(sum(c.time - at_step.get(c.step, c.time) for c in checkpoints), 3),
    }
    if loop["loop_s"] is not None:
        loop["between_steps_s"] = round(loop["loop_s"] - loop["steps_s"] - loop["checkpoint_s"], 3)
    # the loop's own account (engine.training.loop): its time waiting on checkpoints, where the events'
    # times above count a background write's whole length
    account = next((e.details for e in events if e.type == "log" and "loop_s" in e.details), None)
    if account is not None:
        loop["job_account"] = account
    return {
        "state": status["state"],
        "error": status.get("error"),
        "defaults": {
            k: chosen.get(k)
            for k in ("max_seq_length", "micro_batch_size", "gradient_accumulation", "packing", "steps")
        },
        "check_dataset_defaults": {
            k: (flow["check"].get("defaults") or {}).get(k)
            for k in ("max_seq_length", "micro_batch_size", "gradient_accumulation")
        },
        "token_stats": flow["check"].get("tokens"),
        "steps": len(progress),
        "timed_steps": len(timed),
        "tokens_per_s": round(tokens / secs, 1) if secs else None,
        "clock_tokens_per_s": round(tokens / clock, 1) if clock else None,
        "job_tokens_per_s": metrics.get("tokens_per_s"),
        # start-up, from start_finetune's answer (goal: the first step within seconds)
        "started_after_s": round(started, 2) if started is not None else None,
        "training_stage_after_s": round(training, 2) if training is not None else None,
        "first_step_after_s": round(first, 2) if first is not None else None,
        "finished_after_s": round(ended, 2) if ended is not None else None,
        "warm_worker": warm_note,
        "loop": loop,
        "warm_wait_s": flow.get("warm_wait_s"),
        # the whole job against its step rate: the job's own figure (its loop, warm-up steps included)
        # and every step's tokens over the time from start_finetune's answer to the job's end
        "job_over_step_rate": round(metrics["tokens_per_s"] / step_rate, 3)
        if step_rate and metrics.get("tokens_per_s")
        else None,
        "answer_to_end_tokens_per_s": round(all_tokens / ended, 1) if ended else None,
        "answer_to_end_over_step_rate": round(all_tokens / ended / step_rate, 3)
        if ended and step_rate
        else None,
        "step_s": round(secs / len(timed), 4) if timed else None,
        "peak_gpu_memory_gib": metrics.get("peak_gpu_memory_gib"),
        "final_micro_batch": metrics.get("micro_batch_size"),
        "backend": metrics.get("backend"),
        "path": [
            e.message
            for e in events
            if e.type == "log" and {"backend", "speedups", "cuda_graphs", "weights_from"} & set(e.details)
        ],
        "oom_warnings": [w for w in status.get("warnings") or [] if "out of memory" in w.lower()],
        "job_wall_s": flow["job_wall_s"],
        "flow_wall_s": flow["flow_wall_s"],
        "gpu": flow["gpu"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-0.5b")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny shapes, small data, a few steps")
    p.add_argument("--rows", type=int, default=None, help="dataset rows (1200; --tiny: 96)")
    p.add_argument("--median", type=int, default=None, help="median templated tokens (264; --tiny: 66)")
    p.add_argument("--p99", type=int, default=None, help="99th percentile (1041; --tiny: 260)")
    p.add_argument("--steps", type=int, default=None, help="cap the job's steps (default: the defaults')")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (3; --tiny: 1)")
    p.add_argument(
        "--wait-warm", type=float, default=0.0,
        help="before start_finetune, wait up to this many seconds for the server's warm worker",
    )  # fmt: skip
    p.add_argument(
        "--compare-fixed", action="store_true", help="also run train_speed's fixed-length engine run"
    )
    p.add_argument("--fixed-seq", type=int, default=None, help="fixed run: tokens a row (2048; --tiny: 64)")
    p.add_argument("--fixed-batch", type=int, default=None, help="fixed run: micro-batch (4; --tiny: 2)")
    p.add_argument("--fixed-steps", type=int, default=None, help="fixed run: timed steps (10; --tiny: 2)")
    p.add_argument(
        "--workdir", type=str, default=None, help="model, data and job folders (default: a temp dir)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = p.parse_args(argv)
    tiny = args.tiny

    def pick(value: int | None, full: int, small: int) -> int:
        return value if value is not None else (small if tiny else full)

    rows, median, p99 = pick(args.rows, 1200, 96), pick(args.median, 264, 66), pick(args.p99, 1041, 260)
    warmup = pick(args.warmup, 3, 1)
    steps = args.steps if args.steps is not None else (4 if tiny else None)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="server_flow-"))
    work.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.setdefault("BACKPROP_HOME", str(work / "home")))

    model_dir = write_random_model(args.arch, tiny, work / f"model-{args.arch}{'-tiny' if tiny else ''}")
    data = work / f"chat-{rows}.jsonl"
    t0 = time.perf_counter()
    data_info = write_chat_dataset(data, model_dir, rows, median, p99)
    log(f"dataset {data} in {time.perf_counter() - t0:.1f} s: {data_info}")

    out = summarise(anyio.run(user_flow, model_dir, data, home, steps, args.wait_warm), warmup)
    out = {"arch": args.arch + (" (tiny)" if tiny else ""), "dataset": data_info} | out
    print(f"\n== {out['arch']}: the flow through the server ({out['gpu']})")
    print(f"dataset: {data_info['rows']} rows, median {data_info['median']} tokens, "
          f"p99 {data_info['p99']}, max {data_info['max']}")  # fmt: skip
    for chosen in out["defaults"].values():
        if chosen:
            print(f"  {chosen[1]}")
    if any(out["check_dataset_defaults"][k] != (out["defaults"].get(k) or (None,))[0]
           for k in out["check_dataset_defaults"]):  # fmt: skip
        print(f"  (check_dataset had said {out['check_dataset_defaults']})")
    print(f"state {out['state']}{': ' + str(out['error']) if out['error'] else ''}")
    for line in out["path"]:
        print(f"  {line}")
    print(f"tokens/s {out['tokens_per_s']} over {out['timed_steps']} timed steps of {out['steps']} "
          f"({out['step_s']} s a step); by the clock {out['clock_tokens_per_s']}; "
          f"the job's whole-run figure {out['job_tokens_per_s']}")  # fmt: skip
    print(f"peak GPU memory {out['peak_gpu_memory_gib']} GiB; OOM back-off: {out['oom_warnings'] or 'none'}")
    print(f"wall: job {out['job_wall_s']} s, whole flow {out['flow_wall_s']} s")
    print(f"start-up after start_finetune's answer: worker started {out['started_after_s']} s, training "
          f"stage {out['training_stage_after_s']} s, first step done {out['first_step_after_s']} s; "
          f"{out['warm_worker'] or 'a fresh worker (none warm)'}")  # fmt: skip
    print(f"whole job: the job's figure / step rate = {out['job_over_step_rate']}; from the answer to the "
          f"end {out['answer_to_end_tokens_per_s']} tokens/s = {out['answer_to_end_over_step_rate']} "
          f"of the step rate")  # fmt: skip
    print(f"the loop: {out['loop']}")

    if args.compare_fixed:
        ns = argparse.Namespace(
            seq_len=pick(args.fixed_seq, 2048, 64), batch=pick(args.fixed_batch, 4, 2),
            steps=pick(args.fixed_steps, 10, 2), warmup=warmup, workdir=str(work),
            grad_accum=1, quantization="4bit", memory_fraction=None,  # train_speed's one-card defaults
        )  # fmt: skip
        fixed_data = work / f"fixed-{ns.seq_len}-b{ns.batch}.jsonl"
        info = write_tokens(fixed_data, ARCHS[args.arch]["vocab_size"], ns.batch * (ns.steps + ns.warmup), ns.seq_len,
                            variable=False)  # fmt: skip
        fixed = run_engine(model_dir, fixed_data, ns, packing=False, label=f"fixed {ns.seq_len} mb{ns.batch}")
        fixed = {k: v for k, v in fixed.items() if k not in ("losses", "speedups")} | {"data": info}
        rate = fixed.get("tokens_per_s")
        out["fixed"] = fixed
        out["flow_over_fixed"] = (
            round(out["tokens_per_s"] / rate, 3) if rate and out["tokens_per_s"] else None
        )
        print(f"fixed-length engine run ({ns.seq_len} tokens a row, micro-batch {ns.batch}): "
              f"{fixed.get('tokens_per_s') or fixed.get('error')} tokens/s, peak {fixed.get('peak_mem_gib')} GiB")  # fmt: skip
        print(f"flow / fixed = {out['flow_over_fixed']} (goal >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0 if out["state"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
