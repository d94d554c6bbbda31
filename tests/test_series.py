"""A SLAO series end to end on the tiny model (CPU): slices, runs, merges, the matrix R, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.contract.events import EventWriter, iter_events
from engine.contract.spec import (
    EVENTS_FILE,
    DatasetSettings,
    LoraSettings,
    SafetySettings,
    SeriesSpec,
    TrainSettings,
)
from engine.data.formats import Example
from engine.hardware.gpus import wait_for_safe_gpu
from engine.models.adapters import load_factors, read_adapter_config, read_factors
from engine.recipes.series import STATE_FILE, SeriesState, build_slices, run_series, series_metrics
from engine.training import slao
from engine.training.evaluation import heldout_loss, tokenize_heldout

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    "reverse": lambda w: w[::-1],
    "upper": lambda w: w.upper(),
    "double": lambda w: w + w,
}
WORDS = [
    "cat",
    "dog",
    "sun",
    "map",
    "red",
    "box",
    "pen",
    "cup",
    "hat",
    "bed",
    "fog",
    "jam",
    "kit",
    "log",
    "net",
    "owl",
]


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Path:  # conftest builds it once per session
    return tiny_model_dir


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("tasks")
    paths = []
    for name, fn in TASKS.items():
        path = folder / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for w in WORDS:
                row = {
                    "messages": [
                        {"role": "user", "content": f"{name} {w}"},
                        {"role": "assistant", "content": fn(w)},
                    ]
                }
                f.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def _spec(tiny_model: Path, files: list[Path], **overrides) -> SeriesSpec:
    settings = {
        "model": str(tiny_model),
        "device": "cpu",
        "datasets": [DatasetSettings(path=str(p)) for p in files],
        "steps_per_run": 3,
        "lora": LoraSettings(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "train": TrainSettings(
            micro_batch_size=4, gradient_accumulation=1, learning_rate=5e-3, gradient_checkpointing=False
        ),
        "heldout_fraction": 0.25,
    }
    settings.update(overrides)
    return SeriesSpec(**settings)


def _chat(i: int) -> Example:
    return Example(
        kind="chat",
        messages=[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
    )


def test_slices_split_one_dataset_hold_out_and_replay(tiny_model):
    rows = [_chat(i) for i in range(40)]
    spec = _spec(tiny_model, [Path("all.jsonl")], num_runs=3, samples_per_run=12, replay_fraction=0.5)
    slices = build_slices(spec, [("all.jsonl", rows)])
    assert [s.index for s in slices] == [1, 2, 3]
    for k, s in enumerate(slices):
        own = rows[k * 12 : (k + 1) * 12]
        assert sorted(map(id, s.train + s.heldout)) == sorted(map(id, own))  # consecutive, disjoint
        assert len(s.heldout) == 3  # 25% of 12
    assert slices[0].replay == []
    assert len(slices[2].replay) == round(0.5 * len(slices[2].train))
    earlier = {id(r) for s in slices[:2] for r in s.train}
    assert all(id(r) in earlier for r in slices[2].replay)  # replay never draws held-out rows

    with pytest.raises(ValueError, match="num_runs × samples_per_run"):
        build_slices(
            _spec(tiny_model, [Path("all.jsonl")], num_runs=4, samples_per_run=12), [("all.jsonl", rows)]
        )
    with pytest.raises(ValueError, match="at least 2"):
        build_slices(_spec(tiny_model, [Path("a"), Path("b")]), [("a", rows[:5]), ("b", rows[:1])])


class _FakeMonitor:
    """Stands in for NVML readings (no GPU exists on the test machine)."""

    def __init__(self, temps: list[int], used_mb: int = 1000):
        self.temps = list(temps)
        self.used_mb = used_mb

    def sample(self):
        temp = self.temps.pop(0) if len(self.temps) > 1 else self.temps[0]
        return {"temperature_c": temp, "memory_used_mb": self.used_mb, "memory_total_mb": 80_000}


def test_gpu_check_between_runs_delays_rather_than_crashes(tmp_path):
    from engine.hardware.gpus import GpuOverheated, ThermalGuard

    clock = {"t": 0.0}

    def sleep(s: float) -> None:
        clock["t"] += s

    def now() -> float:
        return clock["t"]

    with EventWriter(tmp_path / "events.jsonl") as events:
        guard = ThermalGuard(SafetySettings())
        waited = wait_for_safe_gpu(
            _FakeMonitor([88, 84, 80, 75]),
            guard,
            events,
            before="run 2",
            max_wait_s=600,
            sleep=sleep,
            clock=now,
        )
        assert waited == 15.0  # three 5-second waits until the card cooled below the resume line
        # Another process holds the memory: wait, then go on with a warning (training backs off on OOM).
        waited = wait_for_safe_gpu(
            _FakeMonitor([60], used_mb=79_000),
            guard,
            events,
            before="run 3",
            needed_free_mb=5000,
            max_wait_s=20,
            sleep=sleep,
            clock=now,
        )
        assert waited > 20
        with pytest.raises(GpuOverheated, match="resume"):
            wait_for_safe_gpu(
                _FakeMonitor([95]),
                ThermalGuard(SafetySettings()),
                events,
                before="run 4",
                max_wait_s=10,
                sleep=sleep,
                clock=now,
            )
    kinds = [(e.type, getattr(e, "message", "") or "") for e in iter_events(tmp_path / "events.jsonl")]
    assert any(t == "warning" and "delaying run 2" in m for t, m in kinds)
    assert any(t == "warning" and "starting run 3 anyway" in m for t, m in kinds)


def _lower_triangle_filled(matrix) -> bool:
    return all(v is not None for t, row in enumerate(matrix) for v in row[: t + 1]) and all(
        v is None for t, row in enumerate(matrix) for v in row[t + 1 :]
    )


def test_three_run_series_fills_R_and_delivers_the_merged_adapter(tmp_path, tiny_model, task_files):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = _spec(tiny_model, task_files)
    job = tmp_path / "job"
    with EventWriter(job / EVENTS_FILE) as events:
        result = run_series(spec, job, events)
    assert result.status == "succeeded"
    m = result.metrics
    assert m["runs"] == 3 and len(m["loss_matrix"]) == 3
    assert _lower_triangle_filled(m["loss_matrix"]) and _lower_triangle_filled(m["accuracy_matrix"])
    for key in (
        "average_accuracy",
        "backward_transfer",
        "forgetting",
        "plasticity",
        "loss_average",
        "loss_backward_transfer",
    ):
        assert m[key] is not None and isinstance(m[key], float)
    assert m["loss_average"] == pytest.approx(sum(m["loss_matrix"][2]) / 3)

    finished = [e for e in iter_events(job / EVENTS_FILE) if e.type == "run_finished"]
    assert [e.run for e in finished] == [1, 2, 3]
    assert [len(e.loss_row) for e in finished] == [1, 2, 3]
    assert finished[-1].loss_row == m["loss_matrix"][2]
    progress = [e for e in iter_events(job / EVENTS_FILE) if e.type == "progress"]
    assert {e.run for e in progress} == {1, 2, 3} and len(progress) == 9
    # Only the newest merged adapter and (for slao) the last fine-tuned one are kept.
    assert sorted(p.name for p in (job / "series" / "merged").iterdir()) == ["run-003"]
    assert sorted(p.name for p in (job / "series" / "finetuned").iterdir()) == ["run-003"]

    # The deliverable is the merged adapter: B_m = B_ft3 + ... differs from the last fine-tuned B,
    # and A_m is the last fine-tuned A.
    adapter = Path(result.artifacts["adapter"])
    merged, _ = load_factors(adapter)
    last_ft, _ = load_factors(result.artifacts["last_finetuned_adapter"])
    config = read_adapter_config(adapter)
    key = next(iter(merged))
    torch.testing.assert_close(merged[key].A, last_ft[key].A)
    assert not torch.allclose(merged[key].B, last_ft[key].B)
    assert config["r"] == 4

    # peft loads it unchanged, and R's last row is that adapter's held-out loss (the merged model,
    # not the raw run, was evaluated).
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    slices = build_slices(spec, [(str(p), _load(p)) for p in task_files])
    held = tokenize_heldout(slices[0].heldout, tokenizer, None)
    loss = heldout_loss(model, held, tokenizer.pad_token_id, "cpu")
    assert loss == pytest.approx(m["loss_matrix"][2][0], abs=1e-4)
    assert read_factors(model)[0][key].B.shape == merged[key].B.shape


def _load(path: Path) -> list[Example]:
    from engine.data.formats import load_examples

    return load_examples(DatasetSettings(path=str(path)))[0]


def test_interrupted_series_resumes_from_the_last_finished_run(tmp_path, tiny_model, task_files):
    from engine.contract.errors import JobCancelled

    spec = _spec(tiny_model, task_files, merge_mode="linear")
    job = tmp_path / "job"
    state_path = job / "series" / STATE_FILE
    calls = {"after_run_1": 0}

    def cancel_during_run_2() -> bool:
        state = SeriesState.load(state_path)
        if state is None or state.completed_runs < 1:
            return False
        calls["after_run_1"] += 1
        return calls["after_run_1"] >= 3  # before run 2, step 1 of run 2, then stop at step 2

    with EventWriter(job / EVENTS_FILE) as events, pytest.raises(JobCancelled):
        run_series(spec, job, events, cancel_during_run_2)
    state = SeriesState.load(state_path)
    assert state is not None and state.completed_runs == 1
    first_row = state.loss_matrix[0]
    assert any((job / "checkpoints" / "run-002").glob("step-*"))  # the run in progress checkpointed

    with EventWriter(job / EVENTS_FILE) as events:
        result = run_series(spec, job, events)
    assert result.metrics["loss_matrix"][0] == first_row
    assert _lower_triangle_filled(result.metrics["loss_matrix"])
    events_list = list(iter_events(job / EVENTS_FILE))
    assert [e.run for e in events_list if e.type == "run_finished"] == [1, 2, 3]
    logs = [e.message for e in events_list if e.type == "log"]
    assert any("resuming the series after run 1" in x for x in logs)
    assert any("resumed from checkpoint at step 1" in x for x in logs)
    # linear keeps every fine-tuned adapter: its merge averages all of them
    assert sorted(p.name for p in (job / "series" / "finetuned").iterdir()) == [
        "run-001",
        "run-002",
        "run-003",
    ]
    assert series_metrics(SeriesState.load(state_path))["loss_average"] == result.metrics["loss_average"]


def test_each_run_starts_from_the_previous_finetuned_B_and_a_QR_orthogonalised_A(
    tmp_path, tiny_model, task_files, monkeypatch
):
    """The paper's initialisation, checked through the real series code (the bug the tool we replace
    shipped was starting run i+1 from the MERGED B). A spy around the real ``train_adapter`` records
    the factors each run starts from and ends with; training itself runs unchanged."""
    import engine.recipes.series as series_recipe

    real_train = series_recipe.train_adapter
    starts: list[slao.Adapter] = []
    ends: list[slao.Adapter] = []

    def spy(model, *args, **kwargs):
        starts.append(read_factors(model)[0])
        outcome = real_train(model, *args, **kwargs)
        ends.append(read_factors(model)[0])
        return outcome

    monkeypatch.setattr(series_recipe, "train_adapter", spy)
    job = tmp_path / "job"
    with EventWriter(job / EVENTS_FILE) as events:
        result = run_series(_spec(tiny_model, task_files, steps_per_run=4), job, events)
    assert len(starts) == len(ends) == 3

    merged: slao.Adapter | None = None
    merged_after: list[slao.Adapter] = []
    for run, ft in enumerate(ends, start=1):
        merged = slao.slao_merge(merged, ft, run)
        merged_after.append(merged)
    for run in (2, 3):
        start, prev_ft = starts[run - 1], ends[run - 2]
        for key, f in start.items():
            torch.testing.assert_close(f.B, prev_ft[key].B, rtol=0, atol=0)  # the fine-tuned B, exactly
            torch.testing.assert_close(f.A, slao.orthogonal_init_A(prev_ft[key].A), rtol=1e-6, atol=1e-6)
            eye = torch.eye(f.rank, dtype=torch.float64)
            torch.testing.assert_close(f.A.double() @ f.A.double().T, eye, rtol=0, atol=1e-5)
            assert not torch.allclose(f.A, prev_ft[key].A)  # A really was re-orthogonalised
    # Run 3 must not start from the merged B (after run 2 it differs from run 2's fine-tuned B).
    key = next(iter(starts[2]))
    assert not torch.allclose(merged_after[1][key].B, ends[1][key].B)
    assert not torch.allclose(starts[2][key].B, merged_after[1][key].B)
    # ...and the delivered adapter is the SLAO merge of exactly these fine-tuned runs.
    delivered, _ = load_factors(result.artifacts["adapter"])
    for key, f in delivered.items():
        torch.testing.assert_close(f.B, merged_after[2][key].B, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.A, ends[2][key].A, rtol=0, atol=0)
