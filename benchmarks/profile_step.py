"""One model, loaded once, trained with the plain step and with the fast path: speed, profile, loss parity.

Loads a model folder the way a job does (engine.models.presets.load_for_training: NF4 on a GPU, Liger
where installed, peft LoRA r=16 on all linear layers, gradient checkpointing), keeps a copy of the
fresh LoRA weights, and then trains the same steps on the same rows from the same start twice:

  plain  the engine's step as it was before the fast path: peft's own LoRA forward, a host sync per
         micro-batch (``float(loss)``) and per step (``float(grad_norm)``), boolean indexing of the
         target positions, transformers' dense block-causal mask for packed rows;
  fast   engine.training.fast_step with fused LoRA (engine.training.fused_lora) and, for packed
         rows, the varlen flash-attention kernel (engine.training.varlen_attention);
  fastc  fast, and each decoder layer compiled (``train.compile``; on the CPU compile only). Its
         line adds torch.compile's counters (graphs, graph breaks, frames compiled);
  fastg  fast, with each micro-batch's forward and backward replayed from a CUDA graph
         (``train.cuda_graphs``, engine.training.cuda_graphs; the engine's default); its line says
         how many graphs were captured and replayed (on the CPU: why none were);
  fastcg fastc with CUDA graphs.
A variant may end in ``+nr`` (no recomputation: gradient checkpointing off, as the defaults choose
where memory allows) or ``+off`` (checkpointed layer inputs offloaded to pinned host memory,
``train.offload_activations``, engine.training.offload), e.g. ``fastg+nr``, ``fast+off``; and in
``+tv`` (packed rows through torch's flash varlen kernel even where FlashAttention-4 is installed)
or ``+fx`` (FlashAttention-4 for fixed rows too), e.g. ``fastg+nr+tv``; ``+um`` keeps the MLP's activation
out of the down projection's node (engine.training.fused_mlp), as the fast path had it before.

``--rounds N`` runs the variants N times, interleaved (plain fast fastc plain fast fastc ...), and
reports each variant's median tokens/s: a small model's step time drifts between steps by more
than the differences being measured.

For each it records per-step losses and times (a CUDA sync after each step, so the time is the
step's), tokens/s over the timed steps, peak memory, and with ``--profile`` two more steps: one
under torch.profiler (the kernels, by category) and one under cProfile (the host's Python, which
is what bounds a small model's step). The loss curves side by side are the parity check: same
data, seed and init.

  python benchmarks/profile_step.py --model-dir DIR --batch 4 --seq-len 2048 --steps 8 --out OUTDIR [--packed]
CPU smoke test: python benchmarks/profile_step.py --tiny --steps 2 --warmup 1 --seq-len 64 --batch 2 --variants plain,fast,fastc [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def old_step(inputs):
    """The engine's step before the fast path (``_one_step`` of the training loop as of 2026-12-01,
    with its checkpointed loss chunks)."""
    import torch

    from engine.training.batching import collate
    from engine.training.loss import causal_lm_loss_sum
    from engine.training.step import StepResult

    model, optimizer, rows, data, micro = (
        inputs.model,
        inputs.optimizer,
        inputs.rows,
        inputs.data,
        inputs.micro,
    )
    pad_id, device, autocast_dtype = inputs.pad_id, inputs.device, inputs.autocast_dtype

    batches = [
        collate(rows[i : i + micro], data.input_ids, data.labels, pad_id=pad_id)
        for i in range(0, len(rows), micro)
    ]
    n_targets = sum(b.target_tokens for b in batches)
    total = 0.0
    for b in batches:
        b = b.to(device)
        with torch.autocast(
            device_type=device.split(":")[0], dtype=autocast_dtype, enabled=autocast_dtype is not None
        ):
            loss_sum = causal_lm_loss_sum(model, b.input_ids, b.position_ids, b.targets, fused=False)
        (loss_sum / n_targets).backward()
        total += float(loss_sum.detach())
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, inputs.max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total / max(1, n_targets), sum(b.real_tokens for b in batches), grad_norm)


def make_data(vocab: int, rows: int, seq_len: int, packed: bool, seed: int = 0):
    from engine.training.loop import Tokenized

    rng = random.Random(seed)
    ids = []
    for _ in range(rows):
        n = seq_len
        if packed:  # log-normal, median ~300, capped (as benchmarks/train_speed.py)
            n = max(16, min(seq_len, int(rng.lognormvariate(math.log(300), 0.9))))
        ids.append([rng.randrange(vocab) for _ in range(n)])
    return Tokenized(ids, [list(x) for x in ids], dropped=0)


def categorize(name: str) -> str:
    n = name.lower()
    if "flash" in n or "attention" in n or "fmha" in n or "sdpa" in n:
        return "attention"
    if "dequant" in n or "kdequantize" in n:
        return "nf4 dequantize"
    if (
        "gemm" in n
        or "matmul" in n
        or n.removeprefix("aten::") in ("mm", "addmm", "bmm")
        or "cutlass" in n
        or "sm90" in n
        or "xmma" in n
    ):
        return "matmul"
    if "cross_entropy" in n or "log_softmax" in n or "nll" in n:
        return "loss"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    if "memcpy" in n or "memset" in n:
        return "copies"
    return "elementwise/other"


def profile_one(fn, out_dir: Path, label: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=30)
    (out_dir / f"profile-{label}.txt").write_text(table)
    cats: dict[str, float] = {}
    kernels = 0
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0)
        if not t:
            continue
        if torch.cuda.is_available() and ev.device_type.name != "CUDA":
            continue
        kernels += ev.count
        c = categorize(ev.key)
        cats[c] = cats.get(c, 0.0) + t / 1e6
    return {"gpu_s_by_category": {k: round(v, 4) for k, v in sorted(cats.items())}, "kernels": kernels}


def host_profile(fn, out_dir: Path, label: str) -> dict:
    """Where the host's time goes in one step (cProfile: Python functions and the C calls they make).

    A small model's step is host-bound (its kernels take a third of the step), and torch.profiler's
    table shows the kernels, not the Python around them; this shows the Python. Written to
    ``pyprofile-<label>.txt`` (by own time, then by cumulative time); the top own-time entries return.
    """
    import cProfile
    import io
    import pstats

    import torch

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    wall = time.perf_counter() - t
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    (out_dir / f"pyprofile-{label}.txt").write_text(text.getvalue())
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:12]  # type: ignore[attr-defined]
    top = [
        {
            "fn": f"{Path(file).name}:{line}({name})",
            "calls": calls,
            "own_s": round(own, 4),
            "cum_s": round(cum, 4),
        }
        for (file, line, name), (_, calls, own, cum, _) in rows
    ]
    return {"step_s_under_cprofile": round(wall, 4), "top_own_time": top}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--arch", default="qwen2.5-7b")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="large enough that the loss moves on repeated rows")
    p.add_argument("--packed", action="store_true", help="log-normal lengths, packed rows (varlen attention)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", default="plain,fast", help="plain,fast,fastc,fastg,fastcg[+nr|+off]")
    p.add_argument(
        "--rounds", type=int, default=1, help="run the variants this many times, interleaved; median"
    )
    p.add_argument(
        "--no-liger", action="store_true", help="leave Liger's kernels out (to compare under compile)"
    )
    p.add_argument("--out", type=Path, default=Path("profile_out"))
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from engine.contract.events import EventWriter  # noqa: F401  (the engine's own imports, as a job)
    from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings
    from engine.training import accel
    from engine.training import varlen_attention as va
    from engine.training.backend import apply_fast_path, compile_decoder_layers, uncompile_decoder_layers
    from engine.training.base_model import load_for_training
    from engine.training.batching import most_pieces_per_row, plan_steps
    from engine.training.cuda_graphs import StepGraphs, why_not
    from engine.training.fast_step import run_step
    from engine.training.fused_lora import unfuse_lora_layers
    from engine.training.fused_mlp import unfuse_gated_mlps
    from engine.training.lora import add_lora
    from engine.training.offload import ActivationOffload
    from engine.training.step import StepInputs
    from engine.training.varlen_attention import VARLEN_FLAG

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model_dir = args.model_dir or Path("/tmp") / f"profile-model-{args.arch}-{args.tiny}"
    if not (model_dir / "config.json").exists():
        from benchmarks.train_speed import write_random_model

        model_dir = write_random_model(args.arch, args.tiny, model_dir)
    spec = FinetuneSpec(
        model=str(model_dir), quantization="4bit" if device != "cpu" else "none",
        lora=LoraSettings(rank=16, alpha=32), train=TrainSettings(backend="native"),
        dataset=DatasetSettings(path="unused.jsonl"),
    )  # fmt: skip
    t0 = time.perf_counter()
    loaded = load_for_training(spec, device)
    speedups = [] if args.no_liger else accel.apply_speedups(loaded.model, device, loaded.info)
    model = add_lora(loaded.model, spec.lora, gradient_checkpointing=True, loaded_info=loaded.info)
    load_s = time.perf_counter() - t0
    checkpointing = {
        m: m._gradient_checkpointing_func
        for m in model.modules()
        if getattr(m, "gradient_checkpointing", False)
    }
    vocab = model.config.vocab_size
    rows_per_step = args.batch
    n_rows = 64 if args.packed else 16  # a few rows again and again: the loss has something to learn
    data = make_data(vocab, n_rows * (8 if args.packed else 1), args.seq_len, args.packed)
    # --profile adds two steps: one under torch.profiler, one under cProfile
    total_steps = args.warmup + args.steps + (2 if args.profile else 0)
    plan = plan_steps(
        data.lengths, max_seq_length=args.seq_len, packing=args.packed, rows_per_step=rows_per_step,
        total_steps=total_steps, seed=0,
    )  # fmt: skip
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    autocast_dtype = accel.autocast_dtype(device)
    report: dict = {
        "device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
        "torch": torch.__version__, "model_dir": str(model_dir), "load_s": round(load_s, 1),
        "speedups": speedups, "batch": args.batch, "seq_len": args.seq_len, "packed": args.packed,
        "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "variants": {},
    }  # fmt: skip

    def run_variant(name: str, first_round: bool) -> dict:
        variant, *modifiers = name.split("+")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(init[n])
                    p.grad = None
        # The variant before left its gradients and, through reference cycles, its optimizer's state:
        # collected here, so a variant's peak does not depend on which ran before it.
        gc.collect()
        unfuse_gated_mlps(model)
        unfuse_lora_layers(model)
        uncompile_decoder_layers(model)
        model.__dict__.pop(VARLEN_FLAG, None)
        offload = ActivationOffload() if "off" in modifiers else None
        for m, func in checkpointing.items():  # +nr: no recomputation; +off: inputs offloaded
            m.gradient_checkpointing = "nr" not in modifiers
            m._gradient_checkpointing_func = offload.wrap(func) if offload else func
        labels = {
            "nr": "no recomputation", "off": "offloaded layer inputs", "tv": "torch's varlen kernel asked for",
            "fx": "FlashAttention-4 for fixed rows too", "um": "the MLP unfused",
        }  # fmt: skip
        applied: list[str] = [labels[m] for m in modifiers]
        os.environ[va.KERNEL_ENV] = "torch" if "tv" in modifiers else "auto"
        va.FA4_FIXED_ROWS = "fx" in modifiers
        compiled = variant in ("fastc", "fastcg")
        if variant != "plain" and device != "cpu":
            applied += apply_fast_path(model, device, loaded.info, compile_layers=compiled)
            if "um" in modifiers:  # the MLP's product kept as the down projection's input, as before
                unfuse_gated_mlps(model)
                applied = [a for a in applied if "MLP" not in a]
        elif compiled:  # the CPU has no fast path to switch on: compile alone
            applied = [f"torch.compile on {compile_decoder_layers(model)} decoder layers"]
        step_fn = old_step if variant == "plain" else run_step
        graphs = None
        if variant in ("fastg", "fastcg") and offload is None:

            class Asked:
                cuda_graphs = True

            no_graphs = why_not(model, device, Asked, distributed=False)
            if no_graphs is None:
                graphs = StepGraphs(model, device, args.seq_len, args.packed, most_pieces_per_row(plan))
            else:
                applied.append(f"no CUDA graphs: {no_graphs}")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device != "cpu")
        inputs = StepInputs(model, opt, [], data, args.batch, 0, device, autocast_dtype, 1.0, graphs)
        torch.manual_seed(0)
        if device != "cpu":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        losses, times, tokens = [], [], []
        model.train()
        for s in range(args.warmup + args.steps):
            t = time.perf_counter()
            last = s + 1 >= len(plan.steps)
            ahead = plan.steps[s + 1] if variant != "plain" and not last else None  # as the loop
            result = step_fn(replace(inputs, rows=plan.steps[s], next_rows=ahead))
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(result.loss)
            tokens.append(result.tokens)
        timed = slice(args.warmup, None)
        rec = {
            "applied": applied,
            "losses": [round(x, 5) for x in losses],
            "step_s": [round(x, 4) for x in times],
            "tokens_per_s": round(sum(tokens[timed]) / sum(times[timed]), 1),
            "median_step_s": round(sorted(times[timed])[len(times[timed]) // 2], 4),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device != "cpu" else None,
        }
        if offload is not None:
            rec["offloaded_gib_per_micro_batch"] = round(offload.offloaded_bytes / 2**30, 3)
        if args.profile and first_round:
            label = f"{name}{'-packed' if args.packed else ''}"
            for key, profiler, step in (("profile", profile_one, 0), ("host", host_profile, 1)):
                rows = plan.steps[args.warmup + args.steps + step]
                rec[key] = profiler(
                    lambda rows=rows, step_fn=step_fn, inputs=inputs: step_fn(replace(inputs, rows=rows)),
                    args.out,
                    label,
                )
        if graphs is not None:
            rec["cuda_graphs"] = graphs.summary()
            graphs.reset()
        if compiled:
            from torch._dynamo.utils import counters

            rec["dynamo"] = {
                "graphs": counters["stats"]["unique_graphs"],
                "graph_breaks": sum(counters["graph_break"].values()),
                "frames_compiled": counters["frames"]["ok"],
            }
        return rec

    # Rounds interleave the variants (A B A B ...): a small model's step time drifts by more than the
    # differences measured, so each variant's figure is the median of its rounds, all in one process.
    for r in range(args.rounds):
        for variant in variants:
            rec = run_variant(variant, first_round=r == 0)
            print(
                json.dumps({variant: {k: v for k, v in rec.items() if k != "losses"}, "round": r + 1}),
                flush=True,
            )
            if r == 0:
                report["variants"][variant] = rec | {
                    "rounds_tokens_per_s": [rec["tokens_per_s"]],
                    "rounds_peak_mem_gib": [rec["peak_mem_gib"]],
                }
            else:
                report["variants"][variant]["rounds_tokens_per_s"].append(rec["tokens_per_s"])
                report["variants"][variant]["rounds_peak_mem_gib"].append(rec["peak_mem_gib"])
    for rec in report["variants"].values():
        rec["tokens_per_s"] = round(statistics.median(rec["rounds_tokens_per_s"]), 1)

    v = report["variants"]
    others = [name for name in v if name != "plain"] if "plain" in v else []
    report["parity_max_abs_loss_diff"] = {
        n: round(max(abs(a - b) for a, b in zip(v["plain"]["losses"], v[n]["losses"], strict=True)), 5)
        for n in others
    }
    report["speedup_over_plain"] = {
        n: round(v[n]["tokens_per_s"] / v["plain"]["tokens_per_s"], 3) for n in others
    }
    name = f"profile_step-{'packed' if args.packed else 'fixed'}-mb{args.batch}.json"
    (args.out / name).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report.get(k) for k in ("parity_max_abs_loss_diff", "speedup_over_plain")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
