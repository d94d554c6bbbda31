"""Does SLAO forget less than sequential LoRA in the paper's regime? (issue 13)

A pretrained multi-skill base, small task deltas (rank-8 LoRA on q_proj/v_proj), six tasks
that share pretrained skills, and the project's own merge code (``engine.training.slao``: ``slao_init``,
``slao_merge``, ``linear_merge``, ``forgetting_metrics``). ``slao_forgetting.py`` stays as it
is; the ``control`` regime here (LoRA on all seven projections, lr × 10) is its large-delta
counterpart on the same base and data.

* World (``slao_skills_world.py``, world seed 0): ~950 word ids (24 symbols, numbers 0–99, 400
  entities with colour/city/pet/age, 80 adjectives with a polarity, a 120-word dictionary,
  12 skill names, 8 reserved task words seen in pretraining only inside knowledge sentences).
* Pretraining: 45% primitive skills, 15% two-step compositions, 25% knowledge, 15% multi-answer
  queries, packed into 128-token rows; probes held out of the corpus (gate G1).
* Tasks T1 polarity, T2 residence, T3 top three, T4 back-translate, T5 profile, T6 tally, each with
  a new instruction ``task <word>``; orders O1 = T1…T6 and O2 = T6 T3 T5 T1 T4 T2.
* Methods: sequential, slao (1/√i), slao_noqr, slao_inv (1/i), linear, replay (40 examples per
  earlier task, 25% of each batch), independent (also at half strength), joint, base.
* Metrics: R[t][i] by exact match of the whole answer (from one teacher-forced pass, which equals
  greedy decoding's exact match), per-token accuracy and answer loss; AA, BWT, forgetting,
  plasticity, FWT, intransigence, AA / AA_joint, base retention (300 probes after the last task);
  diagnostics: ‖s·B·A‖/‖W0‖, subspace similarity of consecutive A's and B's, half-strength ratio.
* The lr is calibrated once on seed 99 from the independent runs only (smallest of 1e-4, 3e-4,
  1e-3 at which every task reaches 0.9); the control uses 10× that lr.

What would convince (written before the first full run; the verdict printed at the end applies it)
-------------------------------------------------------------------------------------------
* Gates (a failed gate means "not in the intended regime", never a verdict on SLAO):
  G1 base probes ≥ 0.95 mean exact match (compositions ≥ 0.8); G2 every independent LoRA ≥ 0.9;
  G3 joint AA ≥ 0.85; G4 sequential BWT ≤ −0.10; G5 (main regime) relative delta ≤ 0.1 and
  half-strength ratio ≥ 0.8 on average.
* Supported ("SLAO forgets less than sequential LoRA in the paper's regime"): G1–G5 pass; paired
  ΔAA (slao − sequential) ≥ +0.05 with its 95% t-interval above 0; ΔBWT > 0; slao plasticity ≥
  sequential plasticity − 0.10; slao ahead in ≥ 5 of 6 series (≥ 5/6 of the series run).
* Refuted at this scale: the gates pass and the interval's upper end is < +0.02.
* The QR step gets credit only if slao − slao_noqr ≥ +0.03 with its interval above 0.
* Otherwise: inconclusive. Whatever the outcome, both regimes' tables, the gates and the
  diagnostics are reported.
* Expected if SLAO works as the paper says: joint ≥ replay ≥ slao ≈ slao_noqr > sequential,
  ΔAA +0.05…+0.15, slao BWT ≈ −0.05 against −0.15…−0.30; control: sequential ≥ slao.

Counts (not the design) shrink to fit a time budget: ``--budget-s`` bounds the wall clock; after
calibration the script measures its own throughput and runs as many seeds (both orders each) as
fit, and reports the counts it used. ``--smoke`` is the CPU check that everything runs offline
(hidden 128, 4 layers, 4 tasks, 1 seed, 1 order, short pretraining): its numbers are not claims.

    python benchmarks/slao_skills.py --smoke          # CPU, offline: that it runs end to end
    # the design on one H200 in 10-minute calls (6,000 pretraining steps ≈ 230 s there): pretrain,
    # calibrate and run what fits, saving the base; later calls load it and run the other seeds
    python benchmarks/slao_skills.py --device cuda --workers 15 --seeds 2 --regimes main \
        --pretrain-budget-s 245 --budget-s 570 --base-out base --json a.json
    python benchmarks/slao_skills.py --device cuda --workers 15 --base base --lr LR --first-seed 1 \
        --seeds 2 --regimes main --json b.json
    python benchmarks/slao_skills.py --combine a.json b.json ...
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import slao_skills_report as report  # noqa: E402
from slao_skills_lora import CONTROL, MAIN, Config, build_model, pretrain, probe_scores, run_unit  # noqa: E402
from slao_skills_world import packed_rows  # noqa: E402

LRS = (1e-4, 3e-4, 1e-3)
CALIBRATION_SEED = 99


def _rows_chunk(args: tuple[int, int]) -> torch.Tensor:
    n, seed = args
    return torch.tensor(packed_rows(n, seed), dtype=torch.int16)


def _warm(_: int) -> int:
    import peft  # noqa: F401  (imports in the worker overlap with the parent's pretraining)
    import transformers  # noqa: F401

    return 0


class Runner:
    """A pool of worker processes running units, with incremental JSON and a wall-clock budget."""

    def __init__(self, args: argparse.Namespace, cfg: Config, t_start: float):
        self.args, self.cfg, self.t_start = args, cfg, t_start
        self.pool = ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn"))
        self.results: dict[str, Any] = {"config": asdict(cfg), "units": [], "log": []}
        self.tmp = Path(tempfile.mkdtemp(prefix="slao-skills-"))

    def log(self, msg: str) -> None:
        line = f"[{time.time() - self.t_start:6.0f} s] {msg}"
        print(line, flush=True)
        self.results["log"].append(line)

    def save(self) -> None:
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.results, indent=1), encoding="utf-8")

    def deadline(self) -> float:
        return self.t_start + self.args.budget_s

    def run(self, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
        futures: list[Future] = [self.pool.submit(run_unit, u) for u in units]
        out = []
        for u, f in zip(units, futures, strict=True):
            try:
                res = f.result()
            except Exception as exc:  # one failed unit (or a dead worker) must not lose the others
                res = {
                    "regime": u["regime"].name,
                    "kind": u["kind"],
                    "seed": u["seed"],
                    "skipped": f"error: {exc!r}",
                }
            out.append(res)
            if "skipped" not in res:
                self.log(f"  done {report.unit_name(res)} in {res['seconds']:.0f} s")
            self.results["units"].append(res)
            if "skipped" in res:
                self.log(f"  skipped {report.unit_name(res)}: {res['skipped']}")
            self.save()
        return out


def _unit(runner: Runner, kind: str, regime: Any, seed: int, lr: float, est_s: float, **extra: Any) -> dict:
    base = {"kind": kind, "regime": regime, "seed": seed, "lr": lr * regime.lr_factor, "cfg": runner.cfg}
    return {
        **base,
        **extra,
        "steps": runner.cfg.steps_per_task,
        "device": runner.args.device,
        "base_path": str(runner.tmp / "base.pt"),
        "start_before": runner.deadline() - est_s,  # a unit that would overrun the budget is skipped
    }


def units_for_seed(runner: Runner, seed: int, lr: float, step_s: float, regimes: list) -> list[dict]:
    """Longest first (chains and joint: T×steps each), then the independent runs."""
    cfg, units = runner.cfg, []
    long_s = step_s * len(cfg.tasks) * cfg.steps_per_task * 1.15
    short_s = step_s * cfg.steps_per_task * 1.15
    for regime in regimes:
        for order in runner.args.orders:
            for chain in ("qr", "plain", "replay"):
                units.append(_unit(runner, "chain", regime, seed, lr, long_s, order=order, chain=chain))
        units.append(_unit(runner, "joint", regime, seed, lr, long_s))
    for regime in regimes:
        for task in cfg.tasks:
            units.append(_unit(runner, "independent", regime, seed, lr, short_s, task=task))
    return units


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny model, 4 tasks, 1 seed, 1 order")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=3600.0, help="wall-clock budget for the whole run")
    p.add_argument("--seeds", type=int, default=3, help="at most this many seeds (0, 1, 2, ...)")
    p.add_argument("--orders", nargs="+", default=["O1", "O2"])
    p.add_argument("--pretrain-steps", type=int)
    p.add_argument("--pretrain-budget-s", type=float, help="cut pretraining to fit this many seconds")
    p.add_argument("--steps-per-task", type=int)
    p.add_argument("--lr", type=float, help="skip the calibration and use this lr (main regime)")
    p.add_argument("--regimes", nargs="+", choices=["main", "control"], default=["main", "control"])
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    p.add_argument("--json", help="write every R matrix, diagnostic and log line here")
    p.add_argument("--base-out", help="also save the pretrained base here (bf16 safetensors shards ≤ 15 MB)")
    p.add_argument("--base", help="load the base that --base-out saved instead of pretraining one")
    p.add_argument(
        "--combine", nargs="+", metavar="JSON", help="tables over the units of earlier runs' --json"
    )
    args = p.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.json)
    t_start = time.time()
    cfg = Config()
    if args.smoke:
        cfg = replace(
            cfg, hidden=128, intermediate=352, layers=4, heads=4, pretrain_steps=3000, pretrain_batch=16,
            steps_per_task=60, tasks=("T1", "T2", "T3", "T4"), n_train=480, n_heldout=50,
        )  # fmt: skip
        args.seeds, args.orders, args.device = 1, ["O1"], "cpu"
        args.pretrain_budget_s = args.pretrain_budget_s or 240.0
    if args.pretrain_steps:
        cfg = replace(cfg, pretrain_steps=args.pretrain_steps)
    if args.steps_per_task:
        cfg = replace(cfg, steps_per_task=args.steps_per_task)
    runner = Runner(args, cfg, t_start)
    regimes = [r for r in (MAIN, CONTROL) if r.name in args.regimes]
    try:
        return _main(runner, cfg, args, regimes)
    finally:
        runner.pool.shutdown(cancel_futures=True)


def _main(runner: Runner, cfg: Config, args: argparse.Namespace, regimes: list) -> int:
    log = runner.log
    res = runner.results
    res["args"] = {k: v for k, v in vars(args).items()}
    if args.base:
        warm = [runner.pool.submit(_warm, k) for k in range(args.workers)]
        base, res["pretrain_steps"] = load_base(Path(args.base))
        log(f"base loaded from {args.base}")
    else:
        # 1. pretraining corpus, generated in the workers (which import torch/peft meanwhile)
        n_rows = cfg.pretrain_steps * cfg.pretrain_batch
        chunk = max(1000, n_rows // (4 * args.workers))
        jobs = [(min(chunk, n_rows - k), k // chunk) for k in range(0, n_rows, chunk)]
        chunks = [runner.pool.submit(_rows_chunk, j) for j in jobs]
        warm = [runner.pool.submit(_warm, k) for k in range(args.workers)]
        rows = torch.cat([f.result() for f in chunks]).long()
        log(f"pretraining corpus: {rows.shape[0]:,} rows × 128 tokens")
        # 2. pretraining; the base every unit starts from is its bf16 rounding, so that a base saved
        # with --base-out and loaded with --base in a later call is exactly the same base
        base, res["pretrain_steps"] = pretrain(cfg, rows, args.device, log, args.pretrain_budget_s)
        base = {k: v.to(torch.bfloat16).float() for k, v in base.items()}
        del rows
        if args.base_out:
            save_base(base, res["pretrain_steps"], Path(args.base_out))
    torch.save(base, runner.tmp / "base.pt")
    model = build_model(cfg, args.device)
    model.load_state_dict(base)
    res["probes"] = probe_scores(model, args.device)
    res["parameters"] = sum(p.numel() for p in model.parameters())
    del model
    log(f"base: {res['parameters'] / 1e6:.1f} M parameters, pretrained {res['pretrain_steps']} steps; "
        f"{report.probe_summary(res['probes'])}")  # fmt: skip
    for f in warm:
        f.result()
    runner.save()
    # 3. lr calibration on seed 99 (independent runs of the main regime only)
    t_cal = time.time()
    if args.lr:
        lr = args.lr
        step_s = None
    else:
        cal = runner.run(
            [
                _unit(runner, "independent", MAIN, CALIBRATION_SEED, x, 0.0, task=t)
                for x in LRS
                for t in cfg.tasks
            ]
        )
        lr, table = report.choose_lr(cal, LRS, list(cfg.tasks))
        res["calibration"] = {"lr": lr, "scores": table}
        done_steps = sum(u["steps"] for u in cal if "skipped" not in u)
        step_s = (time.time() - t_cal) / max(1, done_steps)  # wall seconds per step, all workers busy
        log(f"calibration (seed {CALIBRATION_SEED}, independent, main regime): {table}; lr = {lr:g}; "
            f"{1 / step_s:.0f} LoRA steps/s over {args.workers} workers")  # fmt: skip
    # 4. how many seeds fit
    per_seed_steps = len(regimes) * (len(args.orders) * 3 + 2) * len(cfg.tasks) * cfg.steps_per_task
    remaining = runner.deadline() - time.time()
    n_seeds = args.seeds
    if step_s is not None:
        n_seeds = max(1, min(args.seeds, int(remaining / (per_seed_steps * step_s * 1.1))))
        one_order = per_seed_steps * (3 + 2) / (3 * len(args.orders) + 2)
        if (
            per_seed_steps * step_s * 1.1 > remaining
            and len(args.orders) > 1
            and one_order * step_s < remaining
        ):
            args.orders = args.orders[:1]  # not even one seed with both orders fits: keep one order
    res["counts"] = {
        "seeds": list(range(args.first_seed, args.first_seed + n_seeds)),
        "orders": args.orders,
        "regimes": [r.name for r in regimes],
    }
    log(f"running {n_seeds} seed(s) × {len(args.orders)} order(s) × {len(regimes)} regime(s); "
        f"{remaining:.0f} s left")  # fmt: skip
    units = []
    for seed in range(args.first_seed, args.first_seed + n_seeds):
        units += units_for_seed(runner, seed, lr, (step_s or 0.0) * args.workers, regimes)
    runner.run(units)
    # 5. analysis
    res["analysis"] = report.analyse(res, cfg, regimes)
    runner.save()
    print(report.render(res, cfg), flush=True)
    log("done")
    return 0


def save_base(base: dict[str, torch.Tensor], steps: int, out: Path) -> None:
    """bf16 safetensors in shards of ≤ 15 MB (a device call returns files of at most 16 MiB)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    names = []
    for name, t in [*base.items(), ("", None)]:
        full = sum(v.numel() * 2 for v in shard.values())
        if shard and (t is None or full + t.numel() * 2 > 15_000_000):
            names.append(f"base-{len(names)}.safetensors")
            save_file(shard, str(out / names[-1]))
            shard = {}
        if t is not None:
            shard[name] = t.to(torch.bfloat16).contiguous().clone()  # clone: tied weights share storage
    (out / "base.json").write_text(json.dumps({"pretrain_steps": steps, "shards": names}), encoding="utf-8")


def load_base(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "base.json").read_text(encoding="utf-8"))
    base: dict[str, torch.Tensor] = {}
    for name in meta["shards"]:
        base.update({k: v.float() for k, v in load_file(str(folder / name)).items()})
    return base, meta["pretrain_steps"]


def combine(paths: list[str], out: str | None) -> int:
    """One analysis over several runs (e.g. seeds run in separate calls), each of which pretrained
    the same base from the same seed: their probe scores must agree within 0.01."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    first = runs[0]
    for path, run in zip(paths, runs, strict=True):
        off = max(abs(run["probes"][k] - first["probes"][k]) for k in first["probes"])
        if off > 0.01:
            print(f"warning: {path}'s base probes differ from {paths[0]}'s by up to {off:.3f} (> 0.01)")
    config = {**first["config"], "tasks": tuple(first["config"]["tasks"])}
    cfg = Config(**config)
    res = {**first, "units": [u for run in runs for u in run["units"]], "combined_from": paths}
    names = {name for run in runs for name in run["counts"]["regimes"]}
    regimes = [r for r in (MAIN, CONTROL) if r.name in names]
    res["analysis"] = report.analyse(res, cfg, regimes)
    print(report.render(res, cfg))
    if out:
        Path(out).write_text(json.dumps(res, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
