#!/usr/bin/env python3
"""GRPO speed and memory: the engine's GRPO job vs trl's GRPOTrainer, same model, same settings, same card.

Both train a random-weight model of the architecture asked for (written once, bf16, seeded, as
benchmarks/train_speed.py writes it) with QLoRA (NF4 base, LoRA r=16 alpha 32 on every linear layer)
on the same prompts: ``--prompts-per-step`` prompts a step, ``--generations`` completions of up to
``--max-completion`` tokens each (random weights almost never sample the end of sequence: completions
run to the limit, on both sides alike), temperature 1, no KL term (beta 0, trl's default), trl's dapo
loss, the same reward function (the engine's built-in length reward), micro-batches of ``--micro``
completions, gradient checkpointing as ``--gradient-checkpointing`` says, one optimizer step per
generation batch.

1. the engine runs as a job runs (``python -m engine run <job_dir>``); prompts/s over the timed steps
   (after ``--warmup``) from its progress events, peak memory from its result (torch's max allocated);
2. trl runs in a subprocess of this script (``--trl-worker``): GRPOTrainer with the settings above,
   step times from a callback, torch's max allocated; with ``--unsloth-path`` (Unsloth's pack), also
   Unsloth's GRPO: the same trainer as Unsloth patches it, on Unsloth's NF4 load and LoRA of the same shape
   with its own checkpointing (seeded: its LoRA factors differ, the shapes and settings are the same);
3. one table, and the line for benchmarks/RESULTS.md:
   ``GRPO 0.5B QLoRA: X× trl's GRPOTrainer, Y× its peak memory (card, date)`` for the job as it runs by
   default (sampling graphs), and the same line ``... QLoRA with grpo_sampling_graphs false: ...`` for
   the run with ``generate``.

Usage (GPU machine):
  python benchmarks/grpo_speed.py --arch qwen2.5-0.5b --steps 3 --warmup 1 [--trl-path /tmp/us]
CPU smoke test (tiny shapes, fp32; about three minutes on two shared cores):
  python benchmarks/grpo_speed.py --tiny --steps 2 --warmup 1
  (tests/test_grpo_jobs.py runs it at one prompt of two 4-token completions a step: half a minute)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "stone",
    "cloud",
    "light",
    "paper",
    "garden",
    "window",
    "orange",
    "number",
    "field",
]


def log(*msg: object) -> None:
    print("[grpo_speed]", *msg, file=sys.stderr, flush=True)


def write_prompts(path: Path, count: int, words: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            f.write(json.dumps({"prompt": f"Question {i}: {text}. Answer briefly."}) + "\n")
    return path


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What both sides train with."""
    per_step = args.prompts_per_step * args.generations
    if per_step % args.micro:
        raise SystemExit(f"--micro {args.micro} must divide the step's {per_step} completions")
    return {
        "steps": args.warmup + args.steps,
        "micro": args.micro,
        "accumulation": per_step // args.micro,
        "generations": args.generations,
        "max_completion": args.max_completion,
        "learning_rate": 1e-5,
        "checkpointing": args.gradient_checkpointing == "on",
        "quantization": args.quantization,
    }


def run_engine(
    model_dir: Path, prompts: Path, args: argparse.Namespace, graphs: bool = False
) -> dict[str, Any]:
    from engine.contract.events import read_events
    from engine.contract.settings import training_spec
    from engine.contract.spec import FinetuneSpec, read_result
    from engine.jobs.runner import create_job
    from engine.training.run_diagnostics import environment_recording

    s = settings(args)
    spec = training_spec(
        FinetuneSpec, str(prompts), model=str(model_dir), quantization=s["quantization"], lora_rank=16,
        lora_alpha=32, steps=s["steps"], micro_batch_size=s["micro"], gradient_accumulation=s["accumulation"],
        learning_rate=s["learning_rate"], warmup_steps=0, lr_scheduler="constant", seed=0,
        gradient_checkpointing=s["checkpointing"], method="grpo", grpo_num_generations=s["generations"],
        grpo_max_completion_length=s["max_completion"], grpo_rewards=["length"],
        grpo_sampling_graphs=graphs,
        **({"grpo_generation_batch_size": args.generation_batch} if args.generation_batch else {}),
    )  # fmt: skip
    job_dir = create_job(spec, root=Path(args.workdir) / "jobs")
    log(f"engine: python -m engine run {job_dir}")
    with open(job_dir / "worker.log", "wb") as err:
        rc = subprocess.run(
            [sys.executable, "-m", "engine", "run", str(job_dir)], stderr=err, cwd=ROOT,
            env=environment_recording(
                args.memory_history, "grpo-engine-graphs" if graphs else "grpo-engine", steps=args.memory_steps
            ),
        ).returncode  # fmt: skip
    result = read_result(job_dir)
    rec: dict[str, Any] = {
        "variant": "engine, sampling graphs" if graphs else "engine",
        "rc": rc,
        "job_dir": str(job_dir),
    }
    if result is None or result.status != "succeeded":
        rec["error"] = (result.error if result else None) or (job_dir / "worker.log").read_text()[-1500:]
        return rec
    events, _ = read_events(job_dir / "events.jsonl")
    timed = [e for e in events if e.type == "progress"][args.warmup :]
    secs = sum(e.step_s or 0.0 for e in timed)
    lengths = [e.metrics.get("completions/mean_length", 0.0) for e in timed if e.metrics]
    sampling = [e.metrics.get("timing/sampling_s", 0.0) for e in timed if e.metrics]
    rec.update(
        prompts_per_s=round(len(timed) * args.prompts_per_step / secs, 4) if secs else None,
        step_s=round(secs / len(timed), 3) if timed else None,
        sampling_s=round(sum(sampling) / len(sampling), 3) if sampling else None,
        peak_mem_gib=result.metrics.get("peak_gpu_memory_gib"),
        estimate_gib=result.metrics.get("memory_estimate_gib"),
        mean_completion_tokens=round(sum(lengths) / len(lengths), 1) if lengths else None,
        generation_batch=result.metrics.get("generation_batch_size"),
        micro_batch=result.metrics.get("micro_batch_size"),
    )
    return rec


def run_trl(
    model_dir: Path, prompts: Path, args: argparse.Namespace, framework: str = "trl"
) -> dict[str, Any]:
    """trl's GRPOTrainer in a subprocess of this script, or (``framework="unsloth"``) the same trainer as
    Unsloth patches it, with Unsloth's model and LoRA (its pack: ``--unsloth-path``)."""
    from engine.training.run_diagnostics import environment_recording

    config = {"model": str(model_dir), "prompts": str(prompts), "out": str(Path(args.workdir) / framework)}
    config |= settings(args) | {"warmup": args.warmup, "prompts_per_step": args.prompts_per_step}
    config["framework"] = framework
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", json.dumps(config)]
    env = environment_recording(args.memory_history, f"grpo-{framework}", steps=args.memory_steps)
    path = args.unsloth_path if framework == "unsloth" else args.trl_path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT)) if p)
    log(f"{framework}: GRPOTrainer in a subprocess")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {
            "variant": VARIANTS[framework],
            "error": f"no result (rc {out.returncode}): {out.stderr[-1500:]}",
        }
    return json.loads(lines[-1])


VARIANTS = {"trl": "trl GRPOTrainer", "unsloth": "Unsloth GRPO"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _baseline_model(config: dict[str, Any], cuda: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft config for the trainer) of the baseline ``config["framework"]`` names."""
    import torch

    if config["framework"] == "unsloth":  # imported before transformers and trl, as Unsloth asks
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            config["model"], max_seq_length=config["max_completion"] + 256, dtype=torch.bfloat16,
            load_in_4bit=config["quantization"] == "4bit", fast_inference=False,
        )  # fmt: skip
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none", random_state=0,
            use_gradient_checkpointing="unsloth" if config["checkpointing"] else False,
        )  # fmt: skip
        return model, tokenizer, None
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.training.base_model import bnb_nf4_config

    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if cuda else torch.float32,
        "attn_implementation": "sdpa",
    }
    if config["quantization"] == "4bit":
        kwargs["quantization_config"] = bnb_nf4_config("bf16" if cuda else "fp32")
    model = AutoModelForCausalLM.from_pretrained(
        config["model"], device_map={"": "cuda:0" if cuda else "cpu"}, **kwargs
    )
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    return model, AutoTokenizer.from_pretrained(config["model"]), lora


def trl_worker(config: dict[str, Any]) -> None:
    """trl's GRPOTrainer (Unsloth's, patched, with ``config["framework"] == "unsloth"``) with ``config``'s
    settings; prints one JSON line."""
    import torch

    cuda = torch.cuda.is_available()
    model, tokenizer, lora = _baseline_model(config, cuda)  # Unsloth's import first, where it is asked for
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.contract.grpo import GrpoSettings
    from engine.rewards.scoring import build_rewards
    from engine.training.run_diagnostics import RunDiagnostics

    (reward,) = build_rewards(GrpoSettings(rewards=["length"]).rewards, config["max_completion"])
    args = GRPOConfig(
        output_dir=config["out"], num_generations=config["generations"],
        per_device_train_batch_size=config["micro"], gradient_accumulation_steps=config["accumulation"],
        max_completion_length=config["max_completion"], max_steps=config["steps"],
        learning_rate=config["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        loss_type="dapo", temperature=1.0, top_p=1.0, bf16=cuda, use_cpu=not cuda, report_to=[],
        logging_steps=1, save_strategy="no", seed=0, gradient_checkpointing=config["checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False}, shuffle_dataset=False,
    )  # fmt: skip
    data = load_dataset("json", data_files=config["prompts"], split="train")
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            diagnostics.before_step(len(times))
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            diagnostics.after_step(len(times))

    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward.fn], args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=lora, callbacks=[Timer()],
    )  # fmt: skip
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    diagnostics = RunDiagnostics("cuda" if cuda else "cpu")  # the engine's recording, here too
    trainer.train()
    timed = times[config["warmup"] :]
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    print(
        json.dumps(
            {
                "variant": VARIANTS[config["framework"]],
                "prompts_per_s": round(len(timed) * config["prompts_per_step"] / sum(timed), 4)
                if timed
                else None,
                "step_s": round(sum(timed) / len(timed), 3) if timed else None,
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                "mean_completion_tokens": round(sum(lengths) / len(lengths), 1) if lengths else None,
                "steps": len(times),
            }
        )
    )


def card() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    except Exception:  # no torch here: the table still prints
        return "unknown"


def report(records: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\n{'variant':<24} {'prompts/s':>10} {'step s':>8} {'of it sampling':>15} {'peak GiB':>9} "
        f"{'tokens/completion':>18}"
    )
    for r in records:
        if "error" in r:
            print(f"{r['variant']:<24} ERROR {str(r['error'])[:300]}")
            continue
        print(
            f"{r['variant']:<24} {r.get('prompts_per_s') or 0:>10.3f} {r.get('step_s') or 0:>8.2f} "
            f"{r.get('sampling_s') or '-':>15} {r.get('peak_mem_gib') or 0:>9.2f} "
            f"{r.get('mean_completion_tokens') or 0:>18}"
        )
    size = args.arch.split("-")[-1].upper() + ("-tiny" if args.tiny else "")
    for ours in (r for r in records if r["variant"].startswith("engine") and "error" not in r):
        against = [f for f in (_ratio(ours, records, "trl"), _ratio(ours, records, "unsloth")) if f]
        if against:
            # the job's default samples with graphs: its line is the plain one, the generate run says so
            how = "" if "graphs" in ours["variant"] else " with grpo_sampling_graphs false"
            print(
                f"\nGRPO {size} {'QLoRA' if args.quantization == '4bit' else args.quantization}{how}: "
                f"{'; '.join(against)} ({card()}, {datetime.date.today().isoformat()})"
            )


def _ratio(ours: dict[str, Any], records: list[dict[str, Any]], framework: str) -> str:
    """'X× trl's GRPOTrainer, Y× its peak memory' (or Unsloth's GRPO), where that run gave figures."""
    base = next((r for r in records if r["variant"] == VARIANTS[framework] and r.get("prompts_per_s")), None)
    if base is None or not ours.get("prompts_per_s"):
        return ""
    memory = (
        f"{ours['peak_mem_gib'] / base['peak_mem_gib']:.2f}× its peak memory"
        if ours.get("peak_mem_gib") and base.get("peak_mem_gib")
        else "peak memory not measured (no GPU)"
    )
    name = "trl's GRPOTrainer" if framework == "trl" else "Unsloth's GRPO"
    return f"{ours['prompts_per_s'] / base['prompts_per_s']:.2f}× {name}, {memory}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--arch", choices=["qwen2.5-0.5b", "qwen2.5-7b"], default="qwen2.5-0.5b")
    p.add_argument("--tiny", action="store_true", help="2 layers / hidden 64, fp32, short completions (CPU)")
    p.add_argument(
        "--quantization", choices=["4bit", "16bit", "none"], default=None, help="default 4bit (tiny: none)"
    )
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-completion", type=int, default=None, help="default 256 (tiny: 16)")
    p.add_argument("--micro", type=int, default=8, help="completions per micro-batch (both sides)")
    p.add_argument(
        "--generation-batch", type=int, default=None, help="the engine's (default: its own choice)"
    )
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--prompt-words", type=int, default=24)
    p.add_argument(
        "--trl-path", default="", help="PYTHONPATH for the trl child (where trl and datasets are installed)"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument(
        "--unsloth-path", default="",
        help="also Unsloth's GRPO (trl's GRPOTrainer as Unsloth patches it), with its pack on this PYTHONPATH",
    )  # fmt: skip
    p.add_argument(
        "--sampling", choices=["both", "generate", "graphs"], default="both",
        help="the engine's job with generate, with grpo_sampling_graphs (a CUDA graph of the decode step), or "
        "both (graphs first, then trl, then generate: a cut-off call keeps the pair that matters)",
    )  # fmt: skip
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument(
        "--memory-history", default=None,
        help="a folder: each run writes its allocator history there (benchmarks/memory_at_peak.py reads it)",
    )  # fmt: skip
    p.add_argument(
        "--memory-steps", type=int, default=1,
        help="steps the history covers (keep --warmup at least this: a recorded step is slower)",
    )  # fmt: skip
    p.add_argument("--workdir", type=str, default=None)
    p.add_argument("--jsonl", type=Path, default=None)
    args = p.parse_args(argv)
    if args.trl_worker:
        trl_worker(json.loads(args.trl_worker))
        return 0
    args.quantization = args.quantization or ("none" if args.tiny else "4bit")
    args.max_completion = args.max_completion or (16 if args.tiny else 256)
    if args.tiny:
        args.micro = min(args.micro, args.prompts_per_step * args.generations)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_speed-")
    os.environ.setdefault("BACKPROP_HOME", str(Path(args.workdir) / "home"))
    from train_speed import write_random_model

    model_dir = write_random_model(
        args.arch, args.tiny, Path(args.workdir) / f"model-{args.arch}{'-tiny' if args.tiny else ''}"
    )
    prompts = write_prompts(
        Path(args.workdir) / "prompts.jsonl",
        args.prompts_per_step * (args.steps + args.warmup),
        args.prompt_words,
    )
    records: list[dict[str, Any]] = []
    for name, run, skip in (
        (
            "engine, sampling graphs",
            partial(run_engine, graphs=True),
            args.skip_engine or args.sampling == "generate",
        ),
        ("trl", run_trl, args.skip_trl),
        ("engine", run_engine, args.skip_engine or args.sampling == "graphs"),
        ("unsloth", partial(run_trl, framework="unsloth"), not args.unsloth_path),
    ):
        if skip:
            continue
        t0 = time.perf_counter()
        rec = run(model_dir, prompts, args) | {
            "wall_s": round(time.perf_counter() - t0, 1),
            "settings": settings(args),
        }
        records.append(rec)
        log(name, json.dumps(rec)[:800])
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
    report(records, args)
    return 0 if records and all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
