"""Metrics, gates, verdict and tables of ``slao_skills.py`` (pure Python over its results dict)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.training.slao import forgetting_metrics  # noqa: E402

METHODS = ["sequential", "slao", "slao_noqr", "slao_inv", "linear", "replay"]
CHAIN_OF = {"slao": "qr", "slao_inv": "qr", "linear": "qr", "sequential": "plain", "slao_noqr": "plain"}
CHAIN_OF["replay"] = "replay"
COLUMNS = [
    ("AA", "average"), ("BWT", "backward_transfer"), ("forgetting", "forgetting"),
    ("plasticity", "plasticity"), ("FWT", "forward_transfer"), ("intransigence", "intransigence"),
    ("AA/AA_joint", "normalised_average"), ("base retention", "base_retention"), ("AA (token acc.)", "token_average"),
]  # fmt: skip
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def unit_name(u: dict[str, Any]) -> str:
    parts = [u["regime"], u["kind"], f"seed {u['seed']}"]
    parts += [str(u[k]) for k in ("order", "chain", "task") if k in u]
    return " ".join(parts)


def probe_summary(probes: dict[str, float]) -> str:
    g = probe_gate(probes)
    return (
        f"probes: skills+knowledge {g['base_mean']:.3f} (weakest {g['weakest']}), "
        f"compositions {g['composition_mean']:.3f}"
    )


def probe_gate(probes: dict[str, float]) -> dict[str, Any]:
    base = {k: v for k, v in probes.items() if not k.startswith("comp:")}
    comps = {k: v for k, v in probes.items() if k.startswith("comp:")}
    weakest = min(base, key=lambda k: base[k])
    out = {
        "base_mean": statistics.fmean(base.values()),
        "composition_mean": statistics.fmean(comps.values()),
        "weakest": f"{weakest} {base[weakest]:.2f}",
    }
    out["pass"] = out["base_mean"] >= 0.95 and out["composition_mean"] >= 0.8
    return out


def choose_lr(cal: list[dict[str, Any]], lrs: tuple[float, ...], tasks: list[str]) -> tuple[float, dict]:
    """The smallest lr at which every independent LoRA reaches 0.9 (else the largest)."""
    table: dict[str, dict[str, float]] = {}
    for u in cal:
        if "skipped" in u:
            continue
        table.setdefault(f"{u['lr']:g}", {})[u["task"]] = round(u["exact"][tasks.index(u["task"])], 3)
    for lr in lrs:
        scores = table.get(f"{lr:g}", {})
        if len(scores) == len(tasks) and min(scores.values()) >= 0.9:
            return lr, table
    return lrs[-1], table


def mean_sd(xs: list[float]) -> tuple[float, float] | None:
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean of a − b with a 95% t-interval (n − 1 degrees of freedom), and how often a > b."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    m, sd = statistics.fmean(d), (statistics.stdev(d) if len(d) > 1 else 0.0)
    half = T95.get(len(d) - 1, 1.96) * sd / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {
        "mean": m,
        "low": m - half,
        "high": m + half,
        "wins": sum(x > 0 for x in d),
        "n": len(d),
        "diffs": d,
    }


def _by_seed(units: list[dict], kind: str) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for u in units:
        if u["kind"] == kind:
            out.setdefault(u["seed"], []).append(u)
    return out


def analyse_regime(res: dict[str, Any], tasks: list[str], regime: str) -> dict[str, Any]:
    units = [u for u in res["units"] if u["regime"] == regime and "skipped" not in u and u["seed"] != 99]
    joint = {s: us[0] for s, us in _by_seed(units, "joint").items()}
    ind = {s: {u["task"]: u for u in us} for s, us in _by_seed(units, "independent").items()}
    chains: dict[tuple, dict[str, dict]] = {}
    for u in units:
        if u["kind"] == "chain":
            chains.setdefault((u["seed"], u["order"]), {})[u["chain"]] = u
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    series = []
    diag_chain: dict[str, dict[str, list[float]]] = {}
    for (seed, order), by_chain in sorted(chains.items()):
        if len(by_chain) < 3 or seed not in joint or len(ind.get(seed, {})) < len(tasks):
            continue  # incomplete series are left out of every table
        series.append(f"seed {seed} {order}")
        order_tasks = by_chain["qr"]["tasks"]
        b = [joint[seed]["base_exact"][tasks.index(t)] for t in order_tasks]
        r_ind = [ind[seed][t]["exact"][tasks.index(t)] for t in order_tasks]
        aa_joint = statistics.fmean(joint[seed]["exact"])
        for m in METHODS:
            u = by_chain[CHAIN_OF[m]]
            met = forgetting_metrics(u["R"][m]["exact"], base_scores=b, independent_scores=r_ind)
            met["normalised_average"] = met["average"] / aa_joint if aa_joint > 0 else None  # type: ignore[operator]
            met["base_retention"] = u["base_retention"][m]
            met["token_average"] = forgetting_metrics(u["R"][m]["token"])["average"]
            rows[m].append(met)
        for chain, u in by_chain.items():
            d = diag_chain.setdefault(chain, {"finetuned_delta": [], "sim_A": [], "sim_B": []})
            d["finetuned_delta"] += u["diagnostics"]["finetuned_delta"]
            d["sim_A"] += [s["A"] for s in u["diagnostics"]["similarity"]]
            d["sim_B"] += [s["B"] for s in u["diagnostics"]["similarity"]]
    out: dict[str, Any] = {"series": series, "methods": {}, "references": {}, "diagnostics": {}}
    for m, mets in rows.items():
        if mets:
            out["methods"][m] = {
                key: mean_sd([x[key] for x in mets if x.get(key) is not None]) for _, key in COLUMNS
            }
            out["methods"][m]["per_series"] = mets
    seeds = sorted(s for s in joint if len(ind.get(s, {})) == len(tasks))
    ind_scores = [ind[s][t]["exact"][tasks.index(t)] for s in seeds for t in tasks]
    half = [ind[s][t]["half_exact"][tasks.index(t)] for s in seeds for t in tasks]
    if seeds:
        out["references"] = {
            "independent": mean_sd([statistics.fmean(ind[s][t]["exact"][tasks.index(t)] for t in tasks) for s in seeds]),
            "independent, B × 0.5": mean_sd([statistics.fmean(ind[s][t]["half_exact"][tasks.index(t)] for t in tasks) for s in seeds]),
            "joint": mean_sd([statistics.fmean(joint[s]["exact"]) for s in seeds]),
            "base (zero-shot)": mean_sd([statistics.fmean(joint[s]["base_exact"]) for s in seeds]),
        }  # fmt: skip
        ratios = [h / f for h, f in zip(half, ind_scores, strict=True) if f > 0]
        out["diagnostics"] = {
            "independent_min": min(ind_scores),
            "independent_per_task": {t: [round(ind[s][t]["exact"][tasks.index(t)], 3) for s in seeds] for t in tasks},
            "half_strength_ratio": statistics.fmean(ratios) if ratios else None,
            "independent_delta": statistics.fmean(ind[s][t]["relative_delta"] for s in seeds for t in tasks),
            "joint_delta": statistics.fmean(joint[s]["relative_delta"] for s in seeds),
            "chains": {c: {k: statistics.fmean(v) if v else None for k, v in d.items()} for c, d in diag_chain.items()},
        }  # fmt: skip
    if rows["slao"]:
        aa = {m: [x["average"] for x in rows[m]] for m in ("slao", "sequential", "slao_noqr")}
        out["paired"] = {
            "slao - sequential AA": paired(aa["slao"], aa["sequential"]),
            "slao - sequential BWT": paired(
                [x["backward_transfer"] for x in rows["slao"]],
                [x["backward_transfer"] for x in rows["sequential"]],
            ),
            "slao - slao_noqr AA": paired(aa["slao"], aa["slao_noqr"]),
        }
    out["gates"] = gates(res, out, regime)
    out["verdict"] = verdict(out, regime)
    return out


def gates(res: dict[str, Any], a: dict[str, Any], regime: str) -> dict[str, Any]:
    g: dict[str, Any] = {"G1": probe_gate(res["probes"])}
    d = a.get("diagnostics") or {}
    if not d:
        return g
    g["G2"] = {"independent_min": d["independent_min"], "pass": d["independent_min"] >= 0.9}
    joint = a["references"]["joint"][0]
    g["G3"] = {"joint_AA": joint, "pass": joint >= 0.85}
    if "sequential" in a["methods"]:
        bwt = a["methods"]["sequential"]["backward_transfer"][0]
        g["G4"] = {"sequential_BWT": bwt, "pass": bwt <= -0.10}
    if regime == "main":
        delta = d["chains"].get("plain", {}).get("finetuned_delta") or d["independent_delta"]
        ratio = d["half_strength_ratio"]
        g["G5"] = {"relative_delta": delta, "half_strength_ratio": ratio,
                   "pass": delta <= 0.1 and ratio is not None and ratio >= 0.8}  # fmt: skip
    return g


def verdict(a: dict[str, Any], regime: str) -> str:
    if "paired" not in a:
        return "no complete series"
    failed = [k for k, v in a["gates"].items() if not v["pass"]]
    p, n = a["paired"]["slao - sequential AA"], a["paired"]["slao - sequential AA"]["n"]
    if regime != "main":
        order = "sequential ≥ slao" if p["mean"] <= 0 else "slao > sequential"
        return f"control: {order} (ΔAA {p['mean']:+.3f}, slao ahead in {p['wins']}/{n})"
    if failed:
        return f"not in the intended regime (failed {', '.join(failed)}): no verdict on SLAO"
    m = a["methods"]
    supported = (
        p["mean"] >= 0.05 and p["low"] > 0 and a["paired"]["slao - sequential BWT"]["mean"] > 0
        and m["slao"]["plasticity"][0] >= m["sequential"]["plasticity"][0] - 0.10
        and p["wins"] >= (5 * n + 5) // 6
    )  # fmt: skip
    qr = a["paired"]["slao - slao_noqr AA"]
    qr_note = (
        "; the QR step earns credit"
        if qr["mean"] >= 0.03 and qr["low"] > 0
        else "; the QR step earns no credit"
    )
    if supported:
        return "supported: SLAO forgets less than sequential LoRA in this regime" + qr_note
    if p["high"] < 0.02:
        return "refuted at this scale: SLAO does not beat sequential LoRA here" + qr_note
    return "inconclusive" + qr_note


def analyse(res: dict[str, Any], cfg: Any, regimes: list) -> dict[str, Any]:
    return {r.name: analyse_regime(res, list(cfg.tasks), r.name) for r in regimes}


def _fmt(ms: tuple[float, float] | None) -> str:
    if not ms or ms[0] is None:
        return "–"
    return f"{ms[0]:+.3f} ± {ms[1]:.3f}" if ms[0] < 0 else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def render(res: dict[str, Any], cfg: Any) -> str:
    out = []
    for regime, a in res["analysis"].items():
        out.append(f"\n## {regime} regime: {len(a['series'])} series ({', '.join(a['series'])})\n")
        out.append("| method | " + " | ".join(c for c, _ in COLUMNS) + " |")
        out.append("|---" * (len(COLUMNS) + 1) + "|")
        for m, row in a["methods"].items():
            out.append(f"| {m} | " + " | ".join(_fmt(row.get(k)) for _, k in COLUMNS) + " |")
        for name, ms in a["references"].items():
            out.append(f"| {name} | {_fmt(ms)} |" + " |" * (len(COLUMNS) - 1))
        for name, p in a.get("paired", {}).items():
            out.append(f"\n{name}: {p['mean']:+.3f} (95% CI {p['low']:+.3f} … {p['high']:+.3f}), "
                       f"ahead in {p['wins']}/{p['n']} series")  # fmt: skip
        out.append("\ngates: " + "; ".join(f"{k} {'pass' if v['pass'] else 'FAIL'} ({_gate_text(v)})"
                                           for k, v in a["gates"].items()))  # fmt: skip
        d = a.get("diagnostics", {})
        if d:
            out.append(f"diagnostics: independent ‖sBA‖/‖W0‖ {d['independent_delta']:.3f}, half-strength ratio "
                       f"{_num(d['half_strength_ratio'])}; per chain: " + "; ".join(
                           f"{c} Δ {_num(v['finetuned_delta'])}, sim A {_num(v['sim_A'])}, sim B {_num(v['sim_B'])}"
                           for c, v in d["chains"].items()))  # fmt: skip
        out.append(f"verdict: {a['verdict']}")
    return "\n".join(out)


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _gate_text(v: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {x:.3f}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items() if k != "pass"
    )
