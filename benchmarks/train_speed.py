#!/usr/bin/env python3
"""QLoRA training speed and memory: the engine's real job path vs the plain baseline, same card, same run.

For each architecture asked for, this script
  1. runs the baseline script (a lean transformers+peft+bitsandbytes loop, ``--baseline PATH``) as a
     subprocess, plain and (``--liger-baseline``) with Liger kernels;
  2. writes a random-weight model of the same architecture to disk (bf16 safetensors, seeded) and
     a pre-tokenized dataset of random tokens: fixed length (``seq_len`` tokens a row, as the
     baseline trains on) and, with ``--variable``, log-normal lengths (median ~300, capped at seq_len);
  3. runs the engine exactly as a job runs (``python -m engine run <job_dir>``: from_pretrained with
     NF4, LoRA r=16 on all linear layers, the engine's loop, loss, packing and speed-ups), and reads
     tokens/s (non-padding tokens, timed steps only) and peak GPU memory from its events;
  4. prints one table with the ratios to the plain baseline;
  5. with ``--gpus 0,1``: the same engine run (same global batch, same data) on those cards with DDP
     and (``--fsdp``) FSDP, tokens/s against the one-card run and peak memory per card;
     ``--memory-fraction F`` caps the several-card runs at F of each card's memory
     (``torch.cuda.set_per_process_memory_fraction``, through BACKPROP_CUDA_MEMORY_FRACTION) while the
     one-card run is measured uncapped: a configuration whose one-card peak is above the cap trains
     with FSDP within it.

Usage (GPU machine):
  python benchmarks/train_speed.py --baseline .device/qlora_baseline.py --arch qwen2.5-7b --variable
  python benchmarks/train_speed.py --baseline ... --arch qwen2.5-0.5b
  python benchmarks/train_speed.py --arch qwen2.5-7b --grad-accum 2 --gpus 0,1 --fsdp   # DDP, FSDP vs 1 card
  python benchmarks/train_speed.py --arch qwen2.5-7b --grad-accum 2 --gpus 0,1 --skip-ddp --fsdp \
      --quantization 16bit --memory-fraction 0.114   # FSDP within a 16 GiB cap per card
CPU smoke test (tiny shapes, seconds; --gpus 0,1 on a CPU runs two gloo ranks):
  python benchmarks/train_speed.py --arch qwen2.5-0.5b --tiny --seq-len 64 --batch 2 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
}  # fmt: skip
TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def log(*msg: object) -> None:
    print("[train_speed]", *msg, file=sys.stderr, flush=True)


def write_random_model(arch: str, tiny: bool, out: Path) -> Path:
    """A seeded random-weight model folder (config, bf16 safetensors, the tiny preset's tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from engine.models.tiny import ensure_tiny_model

    if (out / "config.json").exists():
        return out
    cfg_dict = dict(ARCHS[arch], hidden_act="silu", use_cache=False)
    if tiny:
        cfg_dict.update(TINY)
    cfg = Qwen2Config(**cfg_dict)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), max_shard_size="4GB")
    AutoTokenizer.from_pretrained(str(ensure_tiny_model())).save_pretrained(str(tmp))
    tmp.rename(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    log(f"wrote random {arch}{' (tiny)' if tiny else ''} to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def write_tokens(path: Path, vocab: int, rows: int, seq_len: int, variable: bool, seed: int = 0) -> dict:
    """Pre-tokenized rows (``{"input_ids": [...]}``): loss on every token, like the baseline."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as f:
        for _ in range(rows):
            n = seq_len
            if variable:  # log-normal, median ~300 tokens, capped at seq_len
                n = max(16, min(seq_len, int(rng.lognormvariate(math.log(300), 0.9))))
            lengths.append(n)
            f.write(json.dumps({"input_ids": [rng.randrange(vocab) for _ in range(n)]}) + "\n")
    return {
        "rows": rows,
        "tokens": sum(lengths),
        "median": sorted(lengths)[len(lengths) // 2],
        "max": max(lengths),
    }


def run_baseline(script: Path, arch: str, args: argparse.Namespace, liger: bool) -> dict:
    cmd = [
        sys.executable, str(script), "--model-config", arch, "--quant", "4bit", "--seq-len", str(args.seq_len),
        "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    if args.tiny:
        cmd.append("--tiny")
    if liger:
        cmd.append("--liger")
    log("baseline:", " ".join(cmd[1:]))
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"baseline printed no result (rc {out.returncode}): {out.stderr[-800:]}"}
    return json.loads(lines[-1])


def run_unsloth_bench(script: Path, arch: str, batch: int, args: argparse.Namespace) -> dict:
    """Unsloth's own QLoRA loop (shared/bench/unsloth/unsloth_bench.py), same shapes, same card."""
    cmd = [
        sys.executable, str(script), "--batch", str(batch), "--seq-len", str(args.seq_len),
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--model-dir", str(Path(args.workdir) / f"unsloth-model-{arch}"),
    ]  # fmt: skip
    if arch == "qwen2.5-0.5b":
        cmd.append("--small")
    if args.tiny:
        cmd.append("--tiny")
    log("unsloth:", " ".join(cmd[1:]))
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "variant": f"unsloth mb{batch}",
            "error": f"no result (rc {out.returncode}): {out.stderr[-800:]}",
        }
    rec = json.loads(lines[-1])
    rec["variant"] = f"unsloth bench mb{batch}"
    return rec


def run_engine(
    model_dir: Path,
    data: Path,
    args: argparse.Namespace,
    *,
    packing: bool,
    label: str,
    extra: dict | None = None,
    gpus: list[int] | None = None,
    parallel: str = "auto",
) -> dict:
    from engine.contract.events import read_events
    from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings, read_result
    from engine.jobs.runner import create_job

    train = dict(
        steps=args.warmup + args.steps, micro_batch_size=args.batch, gradient_accumulation=args.grad_accum,
        max_seq_length=args.seq_len, packing=packing, learning_rate=1e-4, warmup_steps=0,
        lr_scheduler="constant", seed=0,
    )  # fmt: skip
    train.update(extra or {})
    spec = FinetuneSpec(
        model=str(model_dir), quantization=args.quantization, lora=LoraSettings(rank=16, alpha=32),
        train=TrainSettings(**train), dataset=DatasetSettings(path=str(data)), gpus=gpus, parallel=parallel,
    )  # fmt: skip
    env = dict(os.environ)
    if (
        args.memory_fraction and gpus
    ):  # the one-card run is measured uncapped: its peak is what one card needs
        env["BACKPROP_CUDA_MEMORY_FRACTION"] = str(args.memory_fraction)
    job_dir = create_job(spec, root=Path(args.workdir))
    log(f"engine [{label}]: python -m engine run {job_dir}")
    t0 = time.perf_counter()
    with open(job_dir / "worker.log", "wb") as err:
        rc = subprocess.run(
            [sys.executable, "-m", "engine", "run", str(job_dir)], stderr=err, cwd=ROOT, env=env
        ).returncode
    wall = time.perf_counter() - t0
    events, _ = read_events(job_dir / "events.jsonl")
    result = read_result(job_dir)
    rec: dict = {"variant": f"engine {label}", "rc": rc, "wall_s": round(wall, 1), "job_dir": str(job_dir)}
    if result is None or result.status != "succeeded":
        rec["error"] = (result.error if result else None) or (job_dir / "worker.log").read_text()[-800:]
        return rec
    progress = [e.model_dump(exclude_none=True) for e in events if e.type == "progress"]
    timed = progress[args.warmup :]
    # the events' tokens_per_s is cumulative from the first step; time only the steps after warm-up
    tok = [p.get("tokens") for p in timed]
    secs = [p["step_s"] for p in timed]
    backend_logs = [
        e.details | {"message": e.message} for e in events if e.type == "log" and "backend" in e.details
    ]
    rec.update(
        backend_event=backend_logs[-1] if backend_logs else None,
        tokens_per_s=round(sum(tok) / sum(secs), 1) if all(t is not None for t in tok) and secs else None,
        step_time_s=round(sum(secs) / len(secs), 4) if secs else None,
        peak_mem_gib=result.metrics.get("peak_gpu_memory_gib"),
        micro_batch=result.metrics.get("micro_batch_size"),
        final_loss=result.metrics.get("final_loss"),
        losses=[round(p["loss"], 4) for p in progress],
        speedups=[e.details.get("speedups") for e in events if e.type == "log" and e.details.get("speedups")],
        backend=result.metrics.get("backend"),
        devices=result.metrics.get("devices", 1),
        parallel=result.metrics.get("parallel"),
        peak_mem_gib_per_card=result.metrics.get("peak_gpu_memory_gib_per_device"),
    )
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-7b")
    p.add_argument("--tiny", action="store_true", help="shrink to 2 layers / hidden 64 (CPU smoke test)")
    p.add_argument(
        "--baseline", type=Path, default=None, help="path to qlora_baseline.py (skipped if absent)"
    )
    p.add_argument("--liger-baseline", action="store_true", help="also run the baseline with Liger kernels")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument(
        "--quantization", choices=["4bit", "16bit"], default="4bit", help="the engine's base weights"
    )
    p.add_argument("--gpus", type=str, default="", help="also run on these cards, e.g. 0,1 (DDP)")
    p.add_argument("--skip-ddp", action="store_true", help="with --gpus: no DDP run")
    p.add_argument("--fsdp", action="store_true", help="with --gpus: also an FSDP run")
    p.add_argument(
        "--memory-fraction", type=float, default=None, help="cap the several-card runs' cards at this share"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variable", action="store_true", help="also train on log-normal lengths with packing")
    p.add_argument("--batches", type=str, default="", help="extra engine micro-batch sizes to try, e.g. 8,16")
    p.add_argument("--default-batch", action="store_true", help="also run with the smart default micro-batch")
    p.add_argument("--skip-fixed", action="store_true", help="skip the fixed micro-batch engine run")
    p.add_argument(
        "--unsloth-bench", type=Path, default=None, help="path to unsloth_bench.py (needs unsloth)"
    )
    p.add_argument(
        "--unsloth-batches", type=str, default="", help="micro-batches for unsloth_bench.py, e.g. 4,16"
    )
    p.add_argument("--engine-unsloth", action="store_true", help="also run the engine with backend 'unsloth'")
    p.add_argument(
        "--extra", type=str, default="",
        help='one more engine run with these settings (JSON), e.g. \'{"compile": true}\'; with "packing": true '
        "it trains on --variable's rows",
    )  # fmt: skip
    p.add_argument("--workdir", type=str, default=None)
    p.add_argument("--jsonl", type=Path, default=None)
    args = p.parse_args(argv)
    if args.extra and json.loads(args.extra).get("packing") and not args.variable:
        p.error('--extra with "packing": true needs --variable (its log-normal rows)')
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="train_speed-")
    args.unsloth_bench_batches = (
        [int(x) for x in (args.unsloth_batches or str(args.batch)).split(",") if x]
        if args.unsloth_bench and args.unsloth_bench.exists()
        else []
    )
    os.environ.setdefault("BACKPROP_HOME", str(Path(args.workdir) / "home"))

    records: list[dict] = []

    def add(rec: dict) -> None:  # written as it comes, so a run cut short keeps what it measured
        records.append(rec)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")

    if args.baseline and args.baseline.exists():
        add(run_baseline(args.baseline, args.arch, args, liger=False))
        if args.liger_baseline:
            add(run_baseline(args.baseline, args.arch, args, liger=True))
    model_dir = write_random_model(
        args.arch, args.tiny, Path(args.workdir) / f"model-{args.arch}{'-tiny' if args.tiny else ''}"
    )
    vocab = ARCHS[args.arch]["vocab_size"]
    rows = args.batch * args.grad_accum * (args.steps + args.warmup)
    fixed = Path(args.workdir) / "fixed.jsonl"
    info = write_tokens(fixed, vocab, rows, args.seq_len, variable=False)
    if not args.skip_fixed:
        add(run_engine(model_dir, fixed, args, packing=False, label=f"fixed {args.seq_len}") | {"data": info})
    gpus = [int(x) for x in args.gpus.split(",") if x]
    for parallel in [m for m, on in (("ddp", not args.skip_ddp), ("fsdp", args.fsdp)) if on and gpus]:
        label = f"fixed {args.seq_len} {len(gpus)} GPUs {parallel}"
        add(
            run_engine(model_dir, fixed, args, packing=False, label=label, gpus=gpus, parallel=parallel)
            | {"data": info}
        )
    for b in [int(x) for x in args.batches.split(",") if x]:
        data_b = Path(args.workdir) / f"fixed-b{b}.jsonl"
        info_b = write_tokens(data_b, vocab, b * (args.steps + args.warmup), args.seq_len, variable=False)
        saved = args.batch
        args.batch = b
        add(
            run_engine(model_dir, data_b, args, packing=False, label=f"fixed {args.seq_len} mb{b}")
            | {"data": info_b}
        )
        if b in args.unsloth_bench_batches:  # Unsloth right after the engine at the same micro-batch
            add(run_unsloth_bench(args.unsloth_bench, args.arch, b, args))
        args.batch = saved
    for b in args.unsloth_bench_batches:
        if b not in [int(x) for x in args.batches.split(",") if x]:
            add(run_unsloth_bench(args.unsloth_bench, args.arch, b, args))
    if args.engine_unsloth:
        add(
            run_engine(model_dir, fixed, args, packing=False, label=f"fixed {args.seq_len} backend unsloth",
                       extra={"backend": "unsloth"}) | {"data": info}
        )  # fmt: skip
    if args.variable:
        var = Path(args.workdir) / "variable.jsonl"
        # enough rows that packing fills every step of seq_len-token rows
        info_v = write_tokens(var, vocab, rows * args.seq_len // 250, args.seq_len, variable=True, seed=1)
        add(run_engine(model_dir, var, args, packing=True, label="log-normal packed") | {"data": info_v})
    if args.extra:  # one more engine run with these settings, e.g. '{"gradient_checkpointing": false}'
        extra = json.loads(args.extra)
        data_x, info_x = fixed, info
        if extra.get("packing"):
            data_x, info_x = var, info_v
        elif extra.get("micro_batch_size"):
            data_x = Path(args.workdir) / "fixed-extra.jsonl"
            n = extra["micro_batch_size"] * (args.steps + args.warmup)
            info_x = write_tokens(data_x, vocab, n, args.seq_len, variable=False)
        add(
            run_engine(model_dir, data_x, args, packing=False, label=args.extra, extra=extra)
            | {"data": info_x}
        )
    if args.default_batch:
        # micro-batch and accumulation left to the engine's smart defaults (what a user gets)
        add(
            run_engine(model_dir, fixed, args, packing=False, label="default micro-batch",
                       extra={"micro_batch_size": None, "gradient_accumulation": None}) | {"data": info}
        )  # fmt: skip

    base = next(
        (
            r
            for r in records
            if r.get("variant", "").startswith("qlora") and not r.get("liger") and r.get("tokens_per_s")
        ),
        None,
    )
    print(f"\n{'variant':<34} {'tokens/s':>10} {'peak GiB':>9} {'x speed':>8} {'x mem':>7}")
    for r in records:
        tps, mem = r.get("tokens_per_s"), r.get("peak_mem_gib")
        name = r.get("variant", "?") + (
            " +liger" if r.get("liger") and "liger" not in r.get("variant", "") else ""
        )
        sx = f"{tps / base['tokens_per_s']:.2f}" if base and tps else "-"
        mx = f"{mem / base['peak_mem_gib']:.2f}" if base and mem and base.get("peak_mem_gib") else "-"
        print(f"{name:<34} {tps or r.get('error', '-')!s:>10.10} {mem or '-'!s:>9.9} {sx:>8} {mx:>7}")
    one = next((r for r in records if r.get("devices") == 1 and r.get("tokens_per_s")), None)
    for r in (r for r in records if (r.get("devices") or 1) > 1):
        speed = (
            f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}x one card's tokens/s"
            if one and r.get("tokens_per_s")
            else "-"
        )
        print(
            f"{r['variant']}: {speed}; peak GiB per card {r.get('peak_mem_gib_per_card') or r.get('error', '-')}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
