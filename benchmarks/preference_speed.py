#!/usr/bin/env python3
"""QLoRA DPO speed, memory and per-step losses: the engine's DPO job against trl's DPOTrainer and Unsloth's
PatchDPOTrainer, on one card in one run.

For each architecture asked for (Qwen2.5-0.5B, Qwen2.5-7B; random bf16 weights as benchmarks/train_speed.py
writes them, the tiny preset's tokenizer), this script
  1. writes pairs of ``--prompt-len``-token prompts and ``--answer-len``-token answers (random words, cut to
     exactly those lengths by the engine's own tokenizing: its chat template, its truncation), and one
     initial LoRA adapter (r=16, alpha=32, every linear layer, seeded; B = 0, so the policy starts as the
     base): the three start from the same weights and see the same tokens in the same order (the engine's
     step plan; trl's sampler set to sequential over the rows in that order);
  2. runs the engine exactly as a job runs (``python -m engine run``: NF4 base, ``method: dpo`` with
     ``init_adapter``, the reference log-probabilities computed once before training);
  3. runs trl's DPOTrainer in a child process (same NF4 model, the same adapter loaded trainable, which trl
     copies as its frozen 'ref'; same batch, learning rate, beta, gradient checkpointing choice, bf16; its
     reference forward inside each step); ``--noise-floor`` (default) adds trl again with each batch as two half micro-batches (gradient
     accumulation 2): the same steps in another order of bf16 arithmetic. Adam's first update is nearly the
     sign of each gradient element, so rounding differences in small gradients grow from step 2 on; how far
     that run's losses lie from trl's is the bf16 noise that the engine's distance from trl is judged by;
  4. runs Unsloth's DPO (``PatchDPOTrainer``, its own NF4 load and LoRA of the same shape, seeded: its A
     factors differ, so only its first step's loss is comparable; its reference forward inside each step)
     in a child process, where it imports;
  5. prints pairs/s over the timed steps (after ``--warmup``), peak GPU memory over training
     (``torch.cuda.max_memory_allocated``), the ratios to trl, the per-step losses side by side, and the
     headline line ``DPO 7B QLoRA: X× trl's DPOTrainer, Y× its peak memory; Z× Unsloth (card, date)``
     ("Unsloth not run" where it was not). Every pair is trained once, so a reference pass made once before
     training is a cost of each pair as much as trl's per-step reference forward is: a run that makes one
     (the engine; trl with ``precompute_ref_log_probs``) shows pairs/s over its timed steps alone and with
     the pass's time shared over every pair it covered, and the headline takes the latter;
  6. with ``--trl-precompute``, last, once the headline is out (so a part's timeout that cuts it loses
     nothing else): trl with ``precompute_ref_log_probs``, the engine's way of making the reference, as a
     control: its reference pass timed, its pairs/s both ways.

The GPU machine has no trl, datasets or bitsandbytes: they travel as wheels, with Unsloth's pack
(../shared/bench/unsloth/README.md: trl 1.15 in it). Put them on PYTHONPATH for the child processes
(``--trl-path``, ``--unsloth-path``).

Usage (GPU machine):
  python benchmarks/preference_speed.py --arch qwen2.5-0.5b --arch qwen2.5-7b --batch 4 --steps 12 --warmup 3 \\
      --trl-path /tmp/us --unsloth-path /tmp/us --jsonl .device/out/preference.jsonl
CPU smoke test (tiny shapes, fp32, no Unsloth):
  python benchmarks/preference_speed.py --tiny --prompt-len 24 --answer-len 16 --batch 2 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BETA, LR, SEED = 0.1, 1e-4, 0


def log(*msg: object) -> None:
    print("[preference_speed]", *msg, file=sys.stderr, flush=True)


def write_pairs(folder: Path, model_dir: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """``pairs.jsonl`` (texts, for the engine's job) and ``tokens.json`` (the engine's own token ids of the
    same pairs in its step plan's order, for trl and Unsloth)."""
    from engine.data.formats import Example
    from engine.data.preference import Preference
    from engine.data.preference_tokens import tokenize_preferences, truncated
    from engine.training.base_model import load_tokenizer
    from engine.training.batching import plan_steps

    rng = random.Random(SEED)
    words = (ROOT / "engine" / "assets" / "tiny_corpus.txt").read_text().split()

    def text(n_words: int) -> str:  # long enough to be cut to the exact token counts below
        return " ".join(rng.choice(words) for _ in range(n_words))

    n = args.batch * (args.steps + args.warmup)
    rows = [
        {"prompt": text(args.prompt_len), "chosen": text(args.answer_len), "rejected": text(args.answer_len)}
        for _ in range(n)
    ]
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = [Example(kind="preference", preference=Preference(**r)) for r in rows]
    seq = args.prompt_len + args.answer_len
    data = truncated(tokenize_preferences(examples, load_tokenizer(str(model_dir))), args.prompt_len, seq)
    assert len(data.units) == n and set(data.sequence_lengths()) == {seq}, "texts too short for the lengths"
    plan = plan_steps(data.lengths, max_seq_length=seq, packing=False, rows_per_step=args.batch,
                      total_steps=args.steps + args.warmup, seed=SEED)  # fmt: skip
    order = [u for step in plan.steps for row in step for u in row]
    tokens = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for u in order:
        c, r = data.units[u]
        p = data.prompt_lengths[c]
        tokens["prompt_ids"].append(data.input_ids[c][:p])
        tokens["chosen_ids"].append(data.input_ids[c][p:])
        tokens["rejected_ids"].append(data.input_ids[r][p:])
    path = folder / "tokens.json"
    path.write_text(json.dumps(tokens))
    return pairs, path


def write_initial_adapter(model_dir: Path, out: Path) -> Path:
    """A seeded LoRA adapter with B = 0 (r=16, alpha=32, every linear layer) that every run starts from; the
    base stays on the meta device (a 7B one is never in memory here), only the LoRA factors are made."""
    if (out / "adapter_config.json").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(SEED)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    config = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM"
    )
    model = get_peft_model(skeleton, config)
    for module in model.modules():
        for which in ("lora_A", "lora_B"):
            for layer in (
                getattr(module, which, {}).values()
                if isinstance(getattr(module, which, None), torch.nn.ModuleDict)
                else ()
            ):
                weight = torch.empty(layer.weight.shape)
                torch.nn.init.kaiming_uniform_(
                    weight, a=5**0.5
                ) if which == "lora_A" else torch.nn.init.zeros_(weight)
                layer.weight = torch.nn.Parameter(weight)
    model.save_pretrained(str(out))
    return out


# -- the three runs ----------------------------------------------------------------------------------


def run_engine(model_dir: Path, pairs: Path, adapter: Path, args: argparse.Namespace) -> dict[str, Any]:
    from engine.contract.events import read_events
    from engine.contract.preference import PreferenceSettings
    from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings, read_result
    from engine.jobs.runner import create_job
    from engine.training.run_diagnostics import environment_recording

    spec = FinetuneSpec(
        model=str(model_dir), method="dpo", init_adapter=str(adapter), quantization=args.quantization,
        preference=PreferenceSettings(beta=BETA, max_prompt_length=args.prompt_len),
        train=TrainSettings(
            steps=args.warmup + args.steps, micro_batch_size=args.batch, gradient_accumulation=1,
            max_seq_length=args.prompt_len + args.answer_len, learning_rate=LR, warmup_steps=0,
            lr_scheduler="constant", seed=SEED, gradient_checkpointing=args.grad_ckpt == "on",
        ),
        dataset=DatasetSettings(path=str(pairs)),
    )  # fmt: skip
    job_dir = create_job(spec, root=Path(args.workdir) / "jobs")
    log(f"engine: python -m engine run {job_dir}")
    with open(job_dir / "worker.log", "wb") as err:
        rc = subprocess.run(
            [sys.executable, "-m", "engine", "run", str(job_dir)], stderr=err, cwd=ROOT,
            env=environment_recording(args.memory_history, f"{model_dir.parent.name}-engine", profile=True),
        ).returncode  # fmt: skip
    result = read_result(job_dir)
    if result is None or result.status != "succeeded":
        return {"variant": "engine", "rc": rc, "error": (job_dir / "worker.log").read_text()[-1500:]}
    events, _ = read_events(job_dir / "events.jsonl")
    progress = [e for e in events if e.type == "progress"]
    timed = [p.step_s or 0.0 for p in progress[args.warmup :]]
    stages = {e.name: e.time for e in events if e.type == "stage"}
    speed = round(args.batch * len(timed) / sum(timed), 3) if timed else None
    reference_s = round(stages.get("training", 0) - stages.get("reference", 0), 2)
    # The pass's own account: its first forward pass (which compiles the head's kernel on a GPU) apart, so
    # the pass can also be counted at its steady rate, as trl's warm-up steps are left out of its figure.
    passes = next((e.details for e in events if e.type == "log" and "first_pass_s" in e.details), None)
    steady_s = None
    if passes and passes["sequences"] > passes["first_pass_sequences"]:
        rest = passes["reference_s"] - passes["first_pass_s"]
        steady_s = round(
            rest * passes["sequences"] / (passes["sequences"] - passes["first_pass_sequences"]), 2
        )
    pairs = args.batch * len(progress)
    return {
        "variant": "engine",
        "pairs_per_s": speed,
        "pairs_per_s_with_reference": with_reference(speed, reference_s, pairs),
        "pairs_per_s_with_steady_reference": with_reference(speed, steady_s, pairs) if steady_s else None,
        "peak_mem_gib": result.metrics.get("peak_gpu_memory_gib"),
        "reference_s": reference_s,
        "reference_pass": passes,
        "reference_steady_s": steady_s,
        "losses": [round(p.loss or 0.0, 5) for p in progress],
        # slow early steps show start-up work sharing the host
        "step_s": [round(p.step_s or 0.0, 4) for p in progress],
        "backend": result.metrics.get("backend"),
        "job_dir": str(job_dir),
    }


def run_child(
    kind: str, model_dir: Path, tokens: Path, adapter: Path, args: argparse.Namespace, extra: list[str]
) -> dict[str, Any]:
    """This script as a ``--worker`` child (trl or Unsloth import their own stack; their memory is their own)."""
    from engine.training.run_diagnostics import environment_recording

    path = args.unsloth_path if kind == "unsloth" else args.trl_path
    name = "-".join([model_dir.parent.name, kind, *extra]).replace("--", "")
    env = environment_recording(args.memory_history, name, profile=True)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT)) if p)
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", str(model_dir), "--tokens", str(tokens),
           "--adapter", str(adapter), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
           str(args.warmup), "--grad-ckpt", args.grad_ckpt, "--quantization", args.quantization,
           "--workdir", args.workdir, *extra]  # fmt: skip
    log(f"{kind}:", " ".join(cmd[2:]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"variant": kind, "error": f"no result (rc {out.returncode}): {out.stderr[-1500:]}"}
    return json.loads(lines[-1])


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One trl or Unsloth DPO run in this process: pairs/s over the timed steps, peak memory, losses."""
    if args.worker == "unsloth":
        import unsloth  # noqa: F401 - first, before transformers and trl, as Unsloth asks
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from engine.training.run_diagnostics import RunDiagnostics

    cuda = torch.cuda.is_available()
    model, tokenizer = _worker_model(args, cuda)
    steps = args.warmup + args.steps
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / f"{args.worker}-out"),
        per_device_train_batch_size=args.batch // args.split, gradient_accumulation_steps=args.split,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.grad_ckpt == "on", gradient_checkpointing_kwargs={"use_reentrant": False},
        beta=BETA, loss_type=["sigmoid"], max_length=None, seed=SEED, max_grad_norm=1.0, disable_tqdm=True,
        optim="adamw_torch_fused" if cuda else "adamw_torch", train_sampling_strategy="sequential",
        precompute_ref_log_probs=args.precompute,
    )  # fmt: skip
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(args.model_dir)
    trainer = DPOTrainer(
        model=model, args=config, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
    )  # fmt: skip
    trainer.train_dataset = Dataset.from_dict(
        json.loads(Path(args.tokens).read_text())
    )  # the engine's tokens
    reference_s = None
    if args.precompute:  # trl computed reference log-probabilities when it was built: again, for these rows
        if cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        trainer.train_dataset = trainer._precompute_ref_logps(trainer.train_dataset, "train", args.batch)
        if cuda:
            torch.cuda.synchronize()
        reference_s = round(time.perf_counter() - began, 2)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            self.diagnostics = RunDiagnostics("cuda" if cuda else "cpu")  # the engine's recordings, here too

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.diagnostics.before_step(len(times))
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            self.diagnostics.after_step(len(times))

    trainer.add_callback(Clock())
    t0 = time.perf_counter()
    trainer.train()
    timed = times[args.warmup :]
    label = args.worker + (" precompute_ref_log_probs" if args.precompute else "")
    label += f", {args.split} micro-batches (noise floor)" if args.split > 1 else ""
    speed = round(args.batch * len(timed) / sum(timed), 3) if timed else None
    reference = {} if reference_s is None else {
        "reference_s": reference_s,
        "pairs_per_s_with_reference": with_reference(speed, reference_s, args.batch * len(times)),
    }  # fmt: skip
    return {
        "variant": label,
        "pairs_per_s": speed,
        **reference,
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "losses": [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h],
        "step_s": [round(t, 4) for t in times],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _worker_model(args: argparse.Namespace, cuda: bool) -> tuple[Any, Any]:
    """The model each framework trains: trl on the shared adapter over an NF4 base, Unsloth its own."""
    import torch

    dtype = torch.bfloat16 if cuda else torch.float32
    if args.worker == "unsloth":
        from unsloth import FastLanguageModel, PatchDPOTrainer

        PatchDPOTrainer()
        model, tokenizer = FastLanguageModel.from_pretrained(
            args.model_dir, max_seq_length=4096, dtype=dtype, load_in_4bit=args.quantization == "4bit"
        )
        model = FastLanguageModel.get_peft_model(
            model, r=16, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none", random_state=SEED,
            use_gradient_checkpointing="unsloth" if args.grad_ckpt == "on" else False)  # fmt: skip
        return model, tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if args.quantization == "4bit":  # the engine's NF4 settings (engine.training.base_model)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=dtype, quantization_config=quant, attn_implementation="sdpa",
        device_map={"": 0} if cuda else None,
    )  # fmt: skip
    return PeftModel.from_pretrained(base, args.adapter, is_trainable=True), None


# -- the report --------------------------------------------------------------------------------------


def with_reference(pairs_per_s: float | None, reference_s: float, pairs: int) -> float | None:
    """Pairs/s counting a reference pass made once before training: its ``reference_s`` shared over the
    ``pairs`` it covered (every pair of the run, each trained once) and added to each pair's step time."""
    if not pairs_per_s or pairs <= 0:
        return None
    return round(1 / (1 / pairs_per_s + reference_s / pairs), 3)


def steps_alone(r: dict[str, Any]) -> Any:
    """A run's pairs/s over its timed steps, a reference pass before training left out."""
    return r.get("pairs_per_s")


def headline_speed(r: dict[str, Any]) -> Any:
    """A run's pairs/s with its reference pass: counted apart where it had one before training, else already
    inside each step (trl's default, Unsloth)."""
    return r.get("pairs_per_s_with_reference", r.get("pairs_per_s"))


def variant_line(r: dict[str, Any], trl: dict[str, Any]) -> str:
    if r.get("error"):
        return f"  {r['variant']:<34} error: {str(r['error']).strip().splitlines()[-1][:200]}"
    speed = _ratio(r.get("pairs_per_s"), trl.get("pairs_per_s"))
    mem = _ratio(r.get("peak_mem_gib"), trl.get("peak_mem_gib"))
    ref = ""
    if "reference_s" in r:
        ref = (
            f"; with its reference pass ({r['reference_s']} s before training) "
            f"{r.get('pairs_per_s_with_reference')} pairs/s ({_ratio(headline_speed(r), headline_speed(trl))} trl)"
        )
    if r.get("pairs_per_s_with_steady_reference"):
        steady = r["pairs_per_s_with_steady_reference"]
        ref += (
            f"; the pass at its steady rate, its first forward pass left out as trl's warm-up steps are "
            f"({r['reference_steady_s']} s): {steady} pairs/s ({_ratio(steady, headline_speed(trl))} trl)"
        )
    return (
        f"  {r['variant']:<34} {r.get('pairs_per_s')} pairs/s over its steps ({speed} trl), "
        f"{r.get('peak_mem_gib')} GiB ({mem} trl){ref}"
    )


def report(arch: str, records: list[dict[str, Any]], card: str) -> str:
    by = {r["variant"]: r for r in records}
    trl, engine = by.get("trl", {}), by.get("engine", {})
    lines = [
        f"\n{arch}: pairs/s, peak GiB, ratio to trl's DPOTrainer (trl: its reference forward in each step)"
    ]
    lines += [variant_line(r, trl) for r in records]
    with_losses = [r for r in records if r.get("losses")]
    lines.append("  per-step losses (and seconds): " + " | ".join(r["variant"] for r in with_losses))
    rows, clocks = [r["losses"] for r in with_losses], [r.get("step_s") or [] for r in with_losses]
    for i in range(max((len(r) for r in rows), default=0)):
        lines.append(
            f"    step {i + 1:>3}: "
            + " | ".join(f"{r[i]:.5f}" if i < len(r) else "-" for r in rows)
            + "   ("
            + " | ".join(f"{c[i]:.3f}" if i < len(c) else "-" for c in clocks)
            + ")"
        )
    if trl.get("losses"):  # how far each run's losses lie from trl's (step 1: policy = reference, log 2)
        for r in records:
            if r is not trl and r.get("losses") and r["variant"] != "unsloth":
                gaps = [abs(a - b) for a, b in zip(r["losses"][1:], trl["losses"][1:], strict=False)]
                if gaps:
                    lines.append(
                        f"  |loss - trl's|, steps 2-{len(gaps) + 1}: {r['variant']}: "
                        f"mean {sum(gaps) / len(gaps):.5f}, max {max(gaps):.5f}"
                    )
    uns = by.get("unsloth")

    def versus_unsloth(speed: Any) -> str:
        if uns is None or uns.get("error"):
            return "Unsloth not run" if uns is None else "Unsloth failed"
        return f"{_ratio(speed(engine), speed(uns))} Unsloth"

    lines.append(
        f"  steps alone (the engine's reference pass left out): {_ratio(steps_alone(engine), steps_alone(trl))} "
        f"trl's DPOTrainer; {versus_unsloth(steps_alone)}"
    )
    size = "7B" if "7b" in arch else "0.5B" if "0.5b" in arch else arch
    lines.append(
        f"DPO {size} QLoRA: {_ratio(headline_speed(engine), headline_speed(trl))} trl's DPOTrainer, "
        f"{_ratio(engine.get('peak_mem_gib'), trl.get('peak_mem_gib'))} its peak memory; "
        f"{versus_unsloth(headline_speed)} ({card}, {time.strftime('%Y-%m-%d')})"
    )
    return "\n".join(lines)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}×" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=["qwen2.5-0.5b", "qwen2.5-7b"], default=None)
    p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, fp32 on the CPU: a smoke test")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--answer-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grad-ckpt", choices=["on", "off"], default="on", help="gradient checkpointing, for all")
    p.add_argument(
        "--quantization", choices=["4bit", "none"], default=None, help="default: 4bit, none with --tiny"
    )
    p.add_argument(
        "--trl-path", default="", help="PYTHONPATH for the trl child (trl, datasets, bitsandbytes)"
    )
    p.add_argument("--unsloth-path", default="", help="PYTHONPATH for the Unsloth child (its pack)")
    p.add_argument(
        "--trl-precompute", action="store_true",
        help="last, after the headline: trl with precompute_ref_log_probs (its reference pass timed), a control",
    )  # fmt: skip
    p.add_argument(
        "--noise-floor", action=argparse.BooleanOptionalAction, default=True,
        help="also trl with each batch as two half micro-batches: the bf16 noise floor of the losses",
    )  # fmt: skip
    p.add_argument("--skip-unsloth", action="store_true")
    p.add_argument(
        "--memory-history", default=None,
        help="a folder: each run writes its allocator history there (benchmarks/memory_at_peak.py reads it) "
        "and its second step's profile",
    )  # fmt: skip
    p.add_argument("--workdir", default=None)
    p.add_argument("--jsonl", type=Path, default=None)
    p.add_argument("--worker", choices=["trl", "unsloth"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precompute", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.quantization = args.quantization or ("none" if args.tiny else "4bit")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="preference_speed-")
    os.environ.setdefault("BACKPROP_HOME", str(Path(args.workdir) / "home"))
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return 0
    import torch
    from train_speed import write_random_model

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    for arch in args.arch or ["qwen2.5-0.5b"]:
        folder = Path(args.workdir) / arch
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = write_random_model(arch, args.tiny, folder / f"model{'-tiny' if args.tiny else ''}")
        pairs, tokens = write_pairs(folder, model_dir, args)
        adapter = write_initial_adapter(model_dir, folder / "initial-adapter")
        records = [
            run_engine(model_dir, pairs, adapter, args),
            run_child("trl", model_dir, tokens, adapter, args, []),
        ]
        if args.noise_floor and args.batch % 2 == 0:
            records.append(run_child("trl", model_dir, tokens, adapter, args, ["--split", "2"]))
        if not args.skip_unsloth and torch.cuda.is_available():
            records.append(run_child("unsloth", model_dir, tokens, adapter, args, []))
        setting = dict(
            arch=arch, card=card, batch=args.batch, prompt_len=args.prompt_len, answer_len=args.answer_len
        )
        record(records, setting, args.jsonl)
        print(report(arch, records, card), flush=True)
        if args.trl_precompute:  # the control, once the headline is out
            control = run_child("trl", model_dir, tokens, adapter, args, ["--precompute"])
            record([control], setting, args.jsonl)
            trl = next(r for r in records if r["variant"] == "trl")
            print("control:\n" + variant_line(control, trl), flush=True)
    return 0


def record(records: list[dict[str, Any]], setting: dict[str, Any], jsonl: Path | None) -> None:
    for r in records:
        r.update(setting)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
