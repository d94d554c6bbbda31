"""The pieces of ``benchmarks/slao_skills.py`` on a tiny configuration (CPU): world, units, report.

The benchmark's numbers are not checked here (a few steps teach nothing); what is checked is that
every unit runs through the real model, peft and ``engine.training.slao`` code and returns well-formed
matrices, and that the report turns them into metrics, gates and a verdict.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import slao_skills_report as report  # noqa: E402
from slao_skills_lora import CONTROL, MAIN, Config, pretrain, run_unit  # noqa: E402
from slao_skills_world import build_probes, build_world, make_task_data, packed_rows  # noqa: E402

TINY = replace(
    Config(),
    hidden=32,
    intermediate=64,
    layers=2,
    heads=2,
    pretrain_steps=2,
    pretrain_batch=4,
    steps_per_task=2,
    batch=8,
    tasks=("T1", "T2", "T3"),
    n_train=40,
    n_heldout=6,
    replay_per_task=4,
)


def test_world_is_deterministic_and_holds_probes_out_of_pretraining():
    w = build_world()
    assert 900 <= len(w.tokens) <= 1100 and len(set(w.tokens)) == len(w.tokens)
    assert packed_rows(3, seed=5) == packed_rows(3, seed=5)
    held = build_probes().held_keys
    assert held and len(build_probes().groups["facts"]) == 1600
    for task in ("T2", "T5"):  # held-out entities are disjoint from the training entities
        d = make_task_data(task, seed=0, n_train=200, n_heldout=200)
        entity_pos = 6 if task == "T2" else 5
        assert not {ex[0][entity_pos] for ex in d.heldout} & {ex[0][entity_pos] for ex in d.train}
    d = make_task_data("T3", seed=0, n_train=300, n_heldout=50)
    assert not {tuple(ex[0][: ex[1]]) for ex in d.heldout} & {tuple(ex[0][: ex[1]]) for ex in d.train}


@pytest.fixture(scope="module")
def base_path(tmp_path_factory) -> str:
    rows = torch.tensor(packed_rows(8, seed=0))
    state, steps = pretrain(TINY, rows, "cpu", lambda _: None)
    assert steps == 2
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save(state, path)
    return str(path)


def _unit(base_path: str, kind: str, regime=MAIN, **extra) -> dict:
    unit = {"kind": kind, "regime": regime, "seed": 0, "lr": 1e-3, "cfg": TINY, "steps": 2}
    return {**unit, **extra, "device": "cpu", "base_path": base_path, "start_before": float("inf")}


def test_units_and_report_run_end_to_end(base_path):
    units = []
    for regime in (MAIN, CONTROL):
        for chain in ("qr", "plain", "replay"):
            units.append(run_unit(_unit(base_path, "chain", regime, order="O1", chain=chain)))
        units.append(run_unit(_unit(base_path, "joint", regime)))
        units += [run_unit(_unit(base_path, "independent", regime, task=t)) for t in TINY.tasks]
    qr = units[0]
    assert qr["tasks"] == ["T1", "T2", "T3"]
    for m in ("slao", "slao_inv", "linear"):
        assert len(qr["R"][m]["exact"]) == 3 and all(len(row) == 3 for row in qr["R"][m]["exact"])
        assert 0.0 <= qr["base_retention"][m] <= 1.0
    assert len(qr["diagnostics"]["similarity"]) == 2  # consecutive fine-tuned adapters
    # After run 1 every SLAO-family merge is the fine-tuned adapter itself.
    assert qr["R"]["slao"]["loss"][0] == pytest.approx(qr["R"]["linear"]["loss"][0], abs=1e-5)
    assert set(units[1]["R"]) == {"sequential", "slao_noqr"} and set(units[2]["R"]) == {"replay"}
    assert "half_exact" in units[4] and "base_exact" in units[3]

    res = {"units": units, "probes": {"skill:copy": 1.0, "facts": 0.9, "comp:sort+reverse": 0.5}}
    res["analysis"] = report.analyse(res, TINY, [MAIN, CONTROL])
    main = res["analysis"]["main"]
    assert main["series"] == ["seed 0 O1"]
    assert set(main["methods"]) == set(report.METHODS)
    assert main["methods"]["slao"]["forward_transfer"] is not None
    assert main["gates"]["G1"]["pass"] is False  # compositions 0.5 < 0.8
    assert main["verdict"].startswith("not in the intended regime")
    assert res["analysis"]["control"]["verdict"].startswith("control:")
    text = report.render(res, TINY)
    assert "| slao |" in text and "gates:" in text


def test_skipped_units_leave_incomplete_series_out(base_path):
    unit = _unit(base_path, "chain", order="O1", chain="qr")
    unit["start_before"] = 0.0
    assert run_unit(unit)["skipped"]
    res = {"units": [run_unit(unit)], "probes": {"skill:copy": 1.0, "comp:a": 1.0}}
    assert report.analyse_regime(res, list(TINY.tasks), "main")["series"] == []


def test_lr_calibration_picks_the_smallest_lr_where_every_task_reaches_0_9():
    def cal(lr, task, score):
        exact = [0.0, 0.0]
        exact[["T1", "T2"].index(task)] = score
        return {"lr": lr, "task": task, "exact": exact}

    units = [cal(1e-4, "T1", 0.95), cal(1e-4, "T2", 0.5), cal(3e-4, "T1", 0.92), cal(3e-4, "T2", 0.9)]
    units += [cal(1e-3, "T1", 1.0), cal(1e-3, "T2", 1.0)]
    assert report.choose_lr(units, (1e-4, 3e-4, 1e-3), ["T1", "T2"])[0] == 3e-4
    assert (
        report.choose_lr(units[:2], (1e-4, 3e-4, 1e-3), ["T1", "T2"])[0] == 1e-3
    )  # none passes: the largest


def test_paired_interval_uses_the_t_quantile():
    p = report.paired([0.3, 0.2, 0.4], [0.1, 0.1, 0.1])
    assert p["mean"] == pytest.approx(0.2) and p["wins"] == 3 and p["n"] == 3
    assert p["high"] - p["mean"] == pytest.approx(4.303 * 0.1 / 3**0.5)


def test_base_saved_in_shards_loads_back_exactly(tmp_path: Path) -> None:
    """--base-out / --base: a base larger than one 15 MB shard (what one device call can return per
    file), tied weights included, comes back bit for bit with its step count."""
    from slao_skills import load_base, save_base

    tied = torch.randn(1000, 512).to(torch.bfloat16).float()
    base = {
        "model.embed_tokens.weight": tied,
        "lm_head.weight": tied,  # tied embeddings share storage, as in the benchmark's model
        **{
            f"model.layers.{i}.mlp.weight": torch.randn(2000, 1408).to(torch.bfloat16).float()
            for i in range(6)
        },
    }
    save_base(base, 6000, tmp_path / "base")
    shards = sorted((tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1 and all(f.stat().st_size <= 15_100_000 for f in shards)
    loaded, steps = load_base(tmp_path / "base")
    assert steps == 6000 and loaded.keys() == base.keys()
    assert all(torch.equal(loaded[k], v) for k, v in base.items())
