"""Does a SLAO series forget less than plain sequential LoRA training? A small, honest benchmark.

The setup, built from scratch so that it runs offline on a CPU in minutes:

* a character-level Llama-style model (a few hundred thousand parameters) that this script
  pretrains itself on a *copy* task ("C:abcde>abcde"), so the base knows the format and one skill;
* ≥ 4 continual-learning tasks on the same inputs, each with one exact answer and each
  learnable by a rank-8 LoRA in a few hundred steps (whole-word permutations such as reverse or
  sort are not, at this size, so they are left out): N shift each letter +1, M mirror each
  letter (a↔j, b↔i, ...), W swap adjacent pairs, L rotate left; then P shift −1, T shift +3;
* one LoRA adapter trained on the tasks in turn (``steps`` optimizer steps each), merged after
  every run by each method, and the merged adapter evaluated by exact match (greedy decoding)
  on held-out inputs of every task seen so far: R[t][i]; then AA, BWT, forgetting, plasticity
  (``engine.training.slao.forgetting_metrics``) and how much of the base's copy skill is left;
* methods: ``slao`` (QR init of A, B from the last fine-tuned B, time-aware B merge),
  ``slao_noqr`` (the ablation: A continues from the last fine-tuned A), ``sequential`` (one
  adapter trained on and on; the deliverable is the last run) and ``linear`` (running average of
  ΔW, re-factorised to rank r); ``--extra`` adds ``ties`` and ``dare``.

The fine-tuned adapters of a SLAO-style series never depend on the merged ones (run i starts
from run i−1's *fine-tuned* adapter), so methods that share an initialisation share one
training trajectory per seed: slao / linear / ties / dare use the QR trajectory, sequential and
slao_noqr the plain one. Every method is therefore compared on exactly the same fine-tuned
adapters and differs only in its merge — two trainings per seed instead of one per method.

    python benchmarks/slao_forgetting.py                        # CPU, a few minutes
    python benchmarks/slao_forgetting.py --device cuda --scale 4 --seeds 5 --tasks 6
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.adapters import Adapter, clone_adapter, read_factors, write_factors  # noqa: E402
from engine.training import slao  # noqa: E402

LETTERS = "abcdefghij"
WORD = 5
SPECIAL = ["<pad>", "<bos>", "<eos>", ":", ">"]
TASK_NAMES = {
    "C": "copy (pretraining)",
    "N": "next letter",
    "M": "mirror letters",
    "W": "swap pairs",
    "L": "rotate left",
    "P": "previous letter",
    "T": "letter +3",
}
TASK_ORDER = "NMWLPT"
VOCAB = SPECIAL + list(LETTERS) + list(TASK_NAMES)
TOK = {t: i for i, t in enumerate(VOCAB)}
PROMPT_LEN = 3 + WORD + 1  # <bos> task : word >
ANSWER_LEN = WORD + 1  # answer <eos>
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def answer(task: str, word: str) -> str:
    shift = {"N": 1, "P": -1, "T": 3}
    if task == "C":
        return word
    if task == "M":
        return "".join(LETTERS[len(LETTERS) - 1 - LETTERS.index(c)] for c in word)
    if task in shift:
        return "".join(LETTERS[(LETTERS.index(c) + shift[task]) % len(LETTERS)] for c in word)
    if task == "W":
        return word[1] + word[0] + word[3] + word[2] + word[4]
    if task == "L":
        return word[1:] + word[0]
    raise ValueError(task)


def encode(task: str, word: str) -> list[int]:
    ids = [TOK["<bos>"], TOK[task], TOK[":"], *(TOK[c] for c in word), TOK[">"]]
    return ids + [TOK[c] for c in answer(task, word)] + [TOK["<eos>"]]


@dataclass
class TaskData:
    task: str
    train: torch.Tensor  # [n, PROMPT_LEN + ANSWER_LEN]
    heldout: torch.Tensor


def make_data(tasks: list[str], n_train: int, n_heldout: int, seed: int) -> dict[str, TaskData]:
    """Each task gets its own random words; held-out words never appear in that task's training set."""
    rng = random.Random(seed)
    out = {}
    for task in tasks:
        words: set[str] = set()
        while len(words) < n_train + n_heldout:
            words.add("".join(rng.choice(LETTERS) for _ in range(WORD)))
        ordered = sorted(words)
        rng.shuffle(ordered)
        rows = torch.tensor([encode(task, w) for w in ordered])
        out[task] = TaskData(task, rows[:n_train], rows[n_train:])
    return out


def build_model(scale: int, device: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = 64 * scale
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2 + scale // 2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=TOK["<pad>"],
        bos_token_id=TOK["<bos>"],
        eos_token_id=TOK["<eos>"],
    )
    return LlamaForCausalLM(config).to(device)


def train_steps(
    model: Any, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int, device: str
) -> float:
    """AdamW on the answer tokens only; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        rows = data[torch.randint(0, data.shape[0], (batch,), generator=gen)].to(device)
        labels = rows.clone()
        labels[:, :PROMPT_LEN] = -100
        loss = model(input_ids=rows, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
    return loss_value


@torch.no_grad()
def exact_match(model: Any, rows: torch.Tensor, device: str) -> float:
    """Greedy decoding of the answer and <eos>; a row counts only if every token is right."""
    model.eval()
    seq = rows[:, :PROMPT_LEN].to(device)
    for _ in range(ANSWER_LEN):  # no padding (all prompts have the same length): plain greedy loop
        nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return float((seq[:, PROMPT_LEN:] == rows[:, PROMPT_LEN:].to(device)).all(dim=1).float().mean())


def pretrain_base(args: argparse.Namespace, device: str, log: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(1000)
    model = build_model(args.scale, device)
    data = make_data(["C"], 4000, 200, seed=1000)["C"]
    t0 = time.time()
    loss = train_steps(model, data.train, args.pretrain_steps, args.batch, 3e-3, 1000, device)
    acc = exact_match(model, data.heldout, device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"base: {n_params / 1e3:.0f}k parameters, copy task pretrained {args.pretrain_steps} steps "
        f"in {time.time() - t0:.0f}s: loss {loss:.4f}, held-out copy exact match {acc:.3f}")  # fmt: skip
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def series_for_seed(
    args: argparse.Namespace, base_state: dict[str, torch.Tensor], seed: int, device: str, log: Any
) -> dict[str, dict[str, Any]]:
    """Both trajectories for one seed; returns per method its R matrix and copy retention."""
    from peft import LoraConfig, get_peft_model

    tasks = list(TASK_ORDER)[: args.tasks]
    data = make_data(tasks + ["C"], args.train_rows, args.heldout_rows, seed=seed)
    trajectories = {
        "qr": ["slao", "linear"] + (["ties", "dare"] if args.extra else []),
        "plain": ["sequential", "slao_noqr"],
    }
    results: dict[str, dict[str, Any]] = {}
    for trajectory, methods in trajectories.items():
        torch.manual_seed(seed)
        model = build_model(args.scale, device)
        model.load_state_dict(base_state)
        lora = LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS, lora_dropout=0.0
        )
        model = get_peft_model(model, lora)
        finetuned_runs: list[Adapter] = []
        merged: dict[str, Adapter | None] = dict.fromkeys(methods)
        matrices: dict[str, list[list[float | None]]] = {m: [] for m in methods}
        other: dict[str, torch.Tensor] = {}
        for run, task in enumerate(tasks, start=1):
            if finetuned_runs:
                prev = finetuned_runs[-1]
                init = slao.slao_init(prev, qr_init=True) if trajectory == "qr" else clone_adapter(prev)
                write_factors(model, init, other)
            loss = train_steps(
                model, data[task].train, args.steps, args.batch, args.lr, seed * 100 + run, device
            )
            finetuned, other = read_factors(model)
            finetuned_runs.append(finetuned)
            for method in methods:
                if method == "sequential":
                    m_adapter = clone_adapter(finetuned)
                elif method in ("slao", "slao_noqr"):
                    m_adapter = slao.slao_merge(merged[method], finetuned, run, "inv_sqrt")
                elif method == "linear":
                    m_adapter, _ = slao.linear_merge(finetuned_runs)
                elif method == "ties":
                    m_adapter, _ = slao.ties_merge(finetuned_runs, density=0.5)
                else:
                    m_adapter, _ = slao.dare_merge(finetuned_runs, drop=0.5, seed=seed)
                merged[method] = m_adapter
                write_factors(model, m_adapter, other)
                row = [exact_match(model, data[t].heldout, device) for t in tasks[:run]]
                matrices[method].append(row + [None] * (len(tasks) - run))
                if run == len(tasks):
                    results[method] = {
                        "R": matrices[method],
                        "copy": exact_match(model, data["C"].heldout, device),
                    }
            log(f"  seed {seed} {trajectory:5s} run {run} ({TASK_NAMES[task]}): train loss {loss:.4f}; "
                + "; ".join(f"{m} {' '.join(f'{v:.2f}' for v in matrices[m][-1][:run])}" for m in methods))  # fmt: skip
            write_factors(model, finetuned, other)  # the next run starts from the fine-tuned adapter
    return results


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.3f}" if values else "n/a"
    return f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--scale", type=int, default=1, help="model width ×64 and training length multiplier (default 1)"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=4, choices=range(4, 7), help="continual tasks, 4..6")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task (default 150 × scale)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default 400 × scale")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--heldout-rows", type=int, default=200)
    p.add_argument("--extra", action="store_true", help="also compare ties and dare")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write every R matrix to this file")
    args = p.parse_args(argv)
    args.steps = args.steps or 150 * args.scale
    args.pretrain_steps = args.pretrain_steps or 400 * args.scale
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU")

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    log(f"SLAO forgetting benchmark: {args.tasks} tasks, {args.seeds} seeds, {args.steps} steps/task, "
        f"rank {args.rank}, scale {args.scale}, device {device}")  # fmt: skip
    base = pretrain_base(args, device, log)
    per_seed = [series_for_seed(args, base, seed, device, log) for seed in range(args.seeds)]
    methods = list(per_seed[0])
    order = [m for m in ("slao", "slao_noqr", "sequential", "linear", "ties", "dare") if m in methods]
    tasks = list(TASK_ORDER)[: args.tasks]

    log("")
    log(f"tasks in order: {', '.join(TASK_NAMES[t] for t in tasks)}; exact match on held-out inputs; "
        f"mean ± sd over {args.seeds} seeds")  # fmt: skip
    header = (
        f"{'method':<11} {'AA':>15} {'BWT':>15} {'forgetting':>15} {'plasticity':>15} {'base copy kept':>15}"
    )
    log(header)
    log("-" * len(header))
    summary = {}
    for method in order:
        rows = [slao.forgetting_metrics(s[method]["R"]) for s in per_seed]
        copy = [s[method]["copy"] for s in per_seed]
        cols = {
            k: [float(r[k]) for r in rows if r[k] is not None]
            for k in ("average", "backward_transfer", "forgetting", "plasticity")
        }
        summary[method] = {**cols, "copy": copy}
        log(f"{method:<11} {mean_sd(cols['average']):>15} {mean_sd(cols['backward_transfer']):>15} "
            f"{mean_sd(cols['forgetting']):>15} {mean_sd(cols['plasticity']):>15} {mean_sd(copy):>15}")  # fmt: skip
    log(f"({time.time() - t0:.0f}s)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "per_seed": per_seed, "summary": summary},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
