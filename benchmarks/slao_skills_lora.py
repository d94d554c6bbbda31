"""Model, pretraining, LoRA training, scoring and the work units of ``slao_skills.py``.

A *unit* is one independent piece of the continual phase (a chain of tasks for one regime,
seed and order; one independent per-task LoRA; the joint LoRA). Units run in worker processes
(``run_unit``), each rebuilding the world from its fixed seed and loading the pretrained base
from a file, so that many units can share one GPU at once: a 26 M-parameter model at batch 32
is launch-bound, and concurrent processes keep the card busy.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from slao_skills_world import (  # noqa: E402
    ORDERS,
    Example,
    build_probes,
    build_world,
    make_task_data,
    retention_probes,
)

from engine.models.adapters import read_factors, write_factors  # noqa: E402
from engine.training import slao  # noqa: E402

IGNORE = -100
TASK_LEN = 24  # every task example fits (the longest, T6, has 18 tokens)
PROBE_LEN = 48


@dataclass(frozen=True)
class Config:
    hidden: int = 512
    intermediate: int = 1408
    layers: int = 8
    heads: int = 8
    pretrain_steps: int = 6000
    pretrain_batch: int = 128
    steps_per_task: int = 313
    batch: int = 32
    rank: int = 8
    tasks: tuple[str, ...] = ("T1", "T2", "T3", "T4", "T5", "T6")
    n_train: int = 2000
    n_heldout: int = 200
    replay_per_task: int = 40
    replay_share: float = 0.25


@dataclass(frozen=True)
class Regime:
    name: str
    targets: tuple[str, ...]
    lr_factor: float  # × the calibrated lr


MAIN = Regime("main", ("q_proj", "v_proj"), 1.0)
CONTROL = Regime(
    "control", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 10.0
)


def order_tasks(cfg: Config, order: str) -> list[str]:
    return [t for t in ORDERS[order] if t in cfg.tasks]


# ---------------------------------------------------------------------------------------------
# tensors and the model


def task_tensors(examples: list[Example], length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, targets) right-padded to ``length``; targets[j] = ids[j+1] on answer tokens, else IGNORE."""
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    tgt = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for n, (seq, start) in enumerate(examples):
        if len(seq) > length:
            raise ValueError(f"example of {len(seq)} tokens does not fit {length}")
        ids[n, : len(seq)] = torch.tensor(seq)
        tgt[n, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])
    return ids.to(device), tgt.to(device)


def build_model(cfg: Config, device: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = len(build_world().tokens)
    config = LlamaConfig(
        vocab_size=64 * math.ceil(vocab / 64),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(device)


def _autocast(device: str) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def _loss(model: Any, ids: torch.Tensor, tgt: torch.Tensor, device: str) -> torch.Tensor:
    with _autocast(device):
        logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=IGNORE)


def pretrain(
    cfg: Config, rows: torch.Tensor, device: str, log: Any, budget_s: float | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """AdamW (0.9, 0.95), wd 0.1, warm-up, cosine from 1e-3 to 1e-4; loss on every token.

    With ``budget_s``, the step count is cut (never raised) to what fits that many seconds at the
    speed of steps 11-40 on a GPU (the first steps carry CUDA start-up and are not representative: timing
    them cut the first H200 run's pretraining to a tenth), and the schedule is laid over the steps
    that will run. Returns the
    state dict and the number of steps run.
    """
    torch.manual_seed(1234)
    model = build_model(cfg, device)
    ids = rows.to(device)
    tgt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    tgt = tgt.masked_fill(tgt == 0, IGNORE)
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    plan = {"steps": cfg.pretrain_steps, "warm": min(300, cfg.pretrain_steps // 10)}

    def lr_at(s: int) -> float:
        if s < plan["warm"]:
            return (s + 1) / plan["warm"]
        p = min(1.0, (s - plan["warm"]) / max(1, plan["steps"] - plan["warm"]))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n, b = ids.shape[0], cfg.pretrain_batch
    order = torch.randperm(n, device=device)
    t0, model, s = time.time(), model.train(), 0
    first, last = (10, 40) if device.startswith("cuda") else (1, 6)  # the timed window
    t_first = t0
    while s < plan["steps"]:
        lo = (s * b) % n
        idx = order[lo : lo + b] if lo + b <= n else torch.randperm(n, device=device)[:b]
        loss = _loss(model, ids[idx], tgt[idx], device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        s += 1
        if s == first and budget_s is not None:
            float(loss.detach())  # wait for the device before reading the clock
            t_first = time.time()
        if s == last and budget_s is not None:
            float(loss.detach())
            fit = int(last + (budget_s - (time.time() - t0)) / ((time.time() - t_first) / (last - first)))
            if fit < plan["steps"]:
                plan["steps"] = max(last + 10, fit)
                plan["warm"] = min(plan["warm"], plan["steps"] // 10)
                log(f"  pretraining cut to {plan['steps']} steps to fit {budget_s:.0f} s")
        if s % max(1, plan["steps"] // 8) == 0:
            log(
                f"  pretrain step {s}/{plan['steps']}: loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)"
            )
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, s


@torch.no_grad()
def score(model: Any, ids: torch.Tensor, tgt: torch.Tensor, group: torch.Tensor, groups: int, device: str):
    """Per group: exact match, per-token accuracy and mean loss of the answer tokens.

    One teacher-forced pass: greedy decoding reproduces the whole answer (and its <eos>) exactly
    when every answer token is the argmax given the correct prefix, so exact match from this
    pass equals greedy-decoding exact match (barring exact logit ties), at a fraction of the cost.
    """
    was_training = model.training
    model.eval()
    exact = torch.zeros(groups, device=device)
    tok = torch.zeros(groups, device=device)
    loss = torch.zeros(groups, device=device)
    count = torch.zeros(groups, device=device)
    for lo in range(0, ids.shape[0], 1024):
        x, y, g = ids[lo : lo + 1024], tgt[lo : lo + 1024], group[lo : lo + 1024]
        with _autocast(device):
            logits = model(input_ids=x, use_cache=False).logits.float()
        mask = y != IGNORE
        hit = (logits.argmax(-1) == y) & mask
        n_ans = mask.sum(1).clamp_min(1)
        row_loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none")
        row_loss = row_loss.view_as(y).sum(1) / n_ans
        exact.index_add_(0, g, (hit.sum(1) == mask.sum(1)).float())
        tok.index_add_(0, g, hit.sum(1) / n_ans)
        loss.index_add_(0, g, row_loss)
        count.index_add_(0, g, torch.ones_like(row_loss))
    model.train(was_training)
    c = count.clamp_min(1)
    return (exact / c).tolist(), (tok / c).tolist(), (loss / c).tolist()


# ---------------------------------------------------------------------------------------------
# LoRA training


def lora_model(cfg: Config, regime: Regime, base: dict[str, torch.Tensor], seed: int, device: str) -> Any:
    from peft import LoraConfig, get_peft_model

    model = build_model(cfg, device)
    model.load_state_dict(base)
    torch.manual_seed(seed)  # the LoRA initialisation (A kaiming-uniform, B = 0)
    config = LoraConfig(
        r=cfg.rank, lora_alpha=2 * cfg.rank, lora_dropout=0.0, target_modules=list(regime.targets)
    )
    return get_peft_model(model, config)


def epoch_batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``steps`` batches of indices from consecutive shuffled epochs over n rows."""
    flat = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch / n) + 1)])
    return [flat[k * batch : (k + 1) * batch] for k in range(steps)]


def train_lora(
    model: Any,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    cfg: Config,
    device: str,
    replay: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """AdamW (wd 0), 20 warm-up steps then constant lr, clip 1.0, a fresh optimizer; answer-token loss.

    With ``replay``, a ``replay_share`` of each batch is drawn uniformly from the replay buffer.
    """
    gen = torch.Generator().manual_seed(seed)
    n_replay = round(cfg.replay_share * cfg.batch) if replay is not None else 0
    batches = epoch_batches(data[0].shape[0], cfg.batch - n_replay, steps, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=device.startswith("cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    loss = torch.zeros(())
    all_idx = torch.stack(batches).to(device)  # one copy to the device, none per step
    if replay is not None:
        all_r = torch.randint(0, replay[0].shape[0], (steps, n_replay), generator=gen).to(device)
    for step in range(steps):
        idx = all_idx[step]
        ids, tgt = data[0][idx], data[1][idx]
        if replay is not None:
            r = all_r[step]
            ids, tgt = torch.cat([ids, replay[0][r]]), torch.cat([tgt, replay[1][r]])
        loss = _loss(model, ids, tgt, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# diagnostics


def relative_delta(adapter: slao.Adapter, base: dict[str, torch.Tensor], scale: float) -> float:
    """Mean over adapted modules of ‖s·B·A‖_F / ‖W0‖_F."""
    ratios = []
    for key, f in adapter.items():
        w0 = base[key.removeprefix("base_model.model.") + ".weight"].float()
        ratios.append(float((scale * f.delta()).norm()) / float(w0.norm()))
    return sum(ratios) / len(ratios)


def subspace_similarity(first: slao.Adapter, second: slao.Adapter) -> dict[str, float]:
    """Mean over modules of ‖Q1ᵀQ2‖²_F / r for the row spaces of A and the column spaces of B (1 = same)."""

    def sim(x: torch.Tensor, y: torch.Tensor) -> float:
        qx, qy = torch.linalg.qr(x.double())[0], torch.linalg.qr(y.double())[0]
        return float((qx.T @ qy).norm() ** 2 / qx.shape[1])

    a = [sim(first[k].A.T, second[k].A.T) for k in first]
    b = [sim(first[k].B, second[k].B) for k in first]
    return {"A": sum(a) / len(a), "B": sum(b) / len(b)}


def half_strength(adapter: slao.Adapter) -> slao.Adapter:
    return {k: slao.LoraFactors(A=f.A, B=f.B * 0.5) for k, f in adapter.items()}


# ---------------------------------------------------------------------------------------------
# the work units (run in worker processes)


@lru_cache(maxsize=1)
def _base(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@lru_cache(maxsize=32)
def _task_data(task: str, seed: int, n_train: int, n_heldout: int) -> Any:
    return make_task_data(task, seed, n_train, n_heldout)


class EvalSet:
    """Held-out sets of several tasks in one batch (scored by one forward per 1,024 rows)."""

    def __init__(self, sets: list[list[Example]], length: int, device: str):
        flat = [ex for s in sets for ex in s]
        self.ids, self.tgt = task_tensors(flat, length, device)
        self.group = torch.tensor([k for k, s in enumerate(sets) for _ in s], device=device)
        self.groups = len(sets)

    def __call__(self, model: Any, device: str) -> tuple[list[float], list[float], list[float]]:
        return score(model, self.ids, self.tgt, self.group, self.groups, device)


def _data(cfg: Config, task: str, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return task_tensors(_task_data(task, seed, cfg.n_train, cfg.n_heldout).train, TASK_LEN, device)


def _heldout_set(cfg: Config, tasks: list[str], seed: int, device: str) -> EvalSet:
    return EvalSet([_task_data(t, seed, cfg.n_train, cfg.n_heldout).heldout for t in tasks], TASK_LEN, device)


def run_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Run one unit; returns its results (or {"skipped": reason} past the deadline)."""
    if time.time() > unit["start_before"]:
        return {**_public(unit), "skipped": "not started: past the time budget"}
    torch.set_num_threads(unit.get("threads", 1))
    device, cfg, regime = unit["device"], unit["cfg"], unit["regime"]
    base = _base(unit["base_path"])
    t0 = time.time()
    if unit["kind"] == "chain":
        out = _run_chain(unit, cfg, regime, base, device)
    else:
        out = _run_single(unit, cfg, regime, base, device)
    return {**_public(unit), **out, "seconds": round(time.time() - t0, 2)}


def _public(unit: dict[str, Any]) -> dict[str, Any]:
    keep = ("kind", "seed", "order", "chain", "task", "lr", "steps")
    return {"regime": unit["regime"].name, **{k: unit[k] for k in keep if k in unit}}


def _run_single(unit: dict, cfg: Config, regime: Regime, base: dict, device: str) -> dict[str, Any]:
    """An independent per-task LoRA (kind "independent") or the joint LoRA on all tasks ("joint")."""
    seed = unit["seed"]
    tasks = list(cfg.tasks)
    evals = _heldout_set(cfg, tasks, seed, device)
    tag = 0 if unit["kind"] == "joint" else 1 + tasks.index(unit["task"])
    model = lora_model(cfg, regime, base, seed * 1000 + 500 + tag, device)
    out: dict[str, Any] = {}
    if unit["kind"] == "joint":
        out["base_exact"], out["base_token"], out["base_loss"] = evals(model, device)  # B = 0: the base
        parts = [_data(cfg, t, seed, device) for t in tasks]
        data = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        steps = unit["steps"] * len(tasks)
    else:
        data, steps = _data(cfg, unit["task"], seed, device), unit["steps"]
    out["final_train_loss"] = train_lora(model, data, steps, unit["lr"], seed * 7919 + tag, cfg, device)
    ft, other = read_factors(model)
    out["exact"], out["token"], out["loss"] = evals(model, device)
    out["relative_delta"] = relative_delta(ft, base, 2.0)
    if unit["kind"] == "independent":
        write_factors(model, half_strength(ft), other)
        out["half_exact"], out["half_token"], _ = evals(model, device)
    return out


def _run_chain(unit: dict, cfg: Config, regime: Regime, base: dict, device: str) -> dict[str, Any]:
    """One chain over the order's tasks; every method that shares the chain is scored after each task.

    qr: slao (1/√i), slao_inv (1/i) and linear, each run started from slao_init of the previous
    FINE-TUNED adapter; plain: sequential and slao_noqr (A and B simply continue); replay: sequential
    with a buffer of earlier tasks' examples.
    """
    seed, chain = unit["seed"], unit["chain"]
    tasks = order_tasks(cfg, unit["order"])
    evals = _heldout_set(cfg, tasks, seed, device)
    methods = {"qr": ["slao", "slao_inv", "linear"], "plain": ["sequential", "slao_noqr"]}.get(
        chain, ["replay"]
    )
    model = lora_model(cfg, regime, base, seed * 1000 + 1, device)
    R: dict[str, dict[str, list]] = {m: {"exact": [], "token": [], "loss": []} for m in methods}
    diag: dict[str, list] = {"relative_delta": [], "similarity": [], "finetuned_delta": [], "train_loss": []}
    delta_of: dict[str, list[float]] = {m: [] for m in methods}
    finetuned: list[slao.Adapter] = []
    merged: dict[str, slao.Adapter | None] = {"slao": None, "slao_inv": None, "slao_noqr": None}
    buffer: list[Example] = []
    other: dict[str, torch.Tensor] = {}
    for t, task in enumerate(tasks, start=1):
        if finetuned and chain == "qr":
            write_factors(model, slao.slao_init(finetuned[-1], qr_init=True), other)
        replay = task_tensors(buffer, TASK_LEN, device) if (chain == "replay" and buffer) else None
        data = _data(cfg, task, seed, device)
        diag["train_loss"].append(
            train_lora(model, data, unit["steps"], unit["lr"], seed * 7919 + 100 * t, cfg, device, replay)
        )
        ft, other = read_factors(model)
        if finetuned:
            diag["similarity"].append(subspace_similarity(finetuned[-1], ft))
        finetuned.append(ft)
        diag["finetuned_delta"].append(relative_delta(ft, base, 2.0))
        deliverables: dict[str, slao.Adapter] = {}
        for m in methods:
            if m in ("slao", "slao_noqr"):
                merged[m] = slao.slao_merge(merged[m], ft, t, "inv_sqrt")
            elif m == "slao_inv":
                merged[m] = slao.slao_merge(merged[m], ft, t, "inv")
            deliverables[m] = merged.get(m, ft)  # type: ignore[assignment]
            if m == "linear":
                deliverables[m] = slao.linear_merge(finetuned)[0]
        for m, adapter in deliverables.items():
            write_factors(model, adapter, other)
            ex, tok, loss = evals(model, device)
            R[m]["exact"].append(ex)
            R[m]["token"].append(tok)
            R[m]["loss"].append(loss)
            delta_of[m].append(relative_delta(adapter, base, 2.0))
        write_factors(model, ft, other)  # the next run starts from the fine-tuned adapter
        if chain == "replay":
            rng = random.Random(seed * 31 + t)
            buffer += rng.sample(
                _task_data(task, seed, cfg.n_train, cfg.n_heldout).train, cfg.replay_per_task
            )
    retention = EvalSet([retention_probes()], PROBE_LEN, device)
    base_retention = {}
    for m in methods:
        write_factors(model, deliverables[m], other)
        base_retention[m] = retention(model, device)[0][0]
    diag["relative_delta"] = delta_of
    return {"tasks": tasks, "R": R, "base_retention": base_retention, "diagnostics": diag}


def probe_scores(model: Any, device: str) -> dict[str, float]:
    """Exact match of the base on every probe group (gate G1)."""
    groups = build_probes().groups
    names = sorted(groups)
    evals = EvalSet([groups[n] for n in names], PROBE_LEN, device)
    exact = evals(model, device)[0]
    return dict(zip(names, exact, strict=True))
