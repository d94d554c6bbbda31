"""A multi-run continual fine-tuning series (SLAO by default) as one job.

    slices (one dataset cut into N, or one dataset per task; a held-out part of each)
      -> for run i = 1..N:
           initialise the adapter (run 1: fresh LoRA; later: from run i−1's fine-tuned adapter,
             A orthogonalised by QR for SLAO) -> train on slice i (+ replay of earlier slices)
           -> merge (engine.training.slao) -> evaluate the MERGED adapter on the held-out parts of
             slices 1..i (row i of the matrix R) -> checkpoint -> ``run_finished`` event
      -> AA, BWT, forgetting, plasticity; the merged adapter is the deliverable.

Job-folder layout (besides spec.json / events.jsonl / result.json)::

    series/state.json           finished runs, R so far, per-run metrics (the commit point)
    series/finetuned/run-003/   run 3's fine-tuned adapter (next run's initialisation; the
                                linear/ties/dare merges read them all)
    series/merged/run-003/      the merged adapter after run 3 (only the newest is kept)
    checkpoints/run-004/        mid-run training checkpoints of the run in progress
    adapter/                    the final merged adapter (artifact "adapter")

A run's adapters are written first and ``state.json`` last (atomically), so a series killed at
any point resumes from the last run that ``state.json`` names, and a run killed mid-way
resumes from its own newest training checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.contract.errors import JobCancelled
from engine.contract.events import Eval, EventWriter, RunFinished
from engine.contract.files import atomic_write_json, write_dir_atomically
from engine.contract.spec import ADAPTER_DIR, CHECKPOINT_DIR, JobResult, SeriesSpec
from engine.data.formats import Example
from engine.hardware.gpus import GpuMonitor, ThermalGuard, wait_for_safe_gpu
from engine.models.adapters import Adapter, load_factors, read_factors, write_factors
from engine.training import slao
from engine.training.evaluation import HeldoutSet, score, tokenize_heldout
from engine.training.loading import job_device, load_dataset_logged, prepare_training
from engine.training.loop import RunPosition, TrainOutcome, train_adapter
from engine.training.lora import load_lora_model, save_adapter
from engine.training.ranks import active_rank

SERIES_DIR = "series"
STATE_FILE = "state.json"


@dataclass
class RunSlice:
    """One run's data: what it trains on and what it is evaluated on (never trained on)."""

    index: int  # 1-based run number
    name: str
    train: list[Example]
    heldout: list[Example]
    replay: list[Example] = field(default_factory=list)  # rows of earlier runs mixed into training


def _split_heldout(
    rows: list[Example], fraction: float, seed: int, name: str
) -> tuple[list[Example], list[Example]]:
    if len(rows) < 2:
        raise ValueError(
            f"{name} has {len(rows)} usable row(s); each run needs at least 2 (one to train on, one held out). "
            "Give more data, fewer runs, or a larger samples_per_run"
        )
    n_held = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(random.Random(seed).sample(range(len(rows)), n_held))
    train = [r for i, r in enumerate(rows) if i not in held]
    heldout = [r for i, r in enumerate(rows) if i in held]
    return train, heldout


def build_slices(spec: SeriesSpec, datasets: list[tuple[str, list[Example]]]) -> list[RunSlice]:
    """Cut the data into runs, hold out part of each, and add replay of earlier runs.

    One dataset: ``num_runs`` consecutive slices (in file order, which may be meaningful: a
    curriculum, or data arriving over time) of ``samples_per_run`` rows each, or of an equal
    share of the file. Several datasets: one run per dataset, capped at ``samples_per_run``.
    ``heldout_fraction`` of each slice (at least one row) is held out for evaluation.
    """
    seed = spec.train.seed
    chunks: list[tuple[str, list[Example]]] = []
    if len(datasets) == 1:
        name, rows = datasets[0]
        runs = spec.num_runs or 1
        per = spec.samples_per_run or len(rows) // runs
        if per * runs > len(rows):
            raise ValueError(
                f"{name} has {len(rows)} usable rows but num_runs × samples_per_run = {runs} × {per} = "
                f"{runs * per}; lower num_runs or samples_per_run, or give more data"
            )
        for k in range(runs):
            chunks.append((f"{Path(name).name} [slice {k + 1}/{runs}]", rows[k * per : (k + 1) * per]))
    else:
        for name, rows in datasets:
            cap = spec.samples_per_run
            chunks.append((Path(name).name, rows[:cap] if cap else rows))
    slices: list[RunSlice] = []
    for k, (name, rows) in enumerate(chunks, start=1):
        train, heldout = _split_heldout(rows, spec.heldout_fraction, seed + 7919 * k, name)
        slices.append(RunSlice(index=k, name=name, train=train, heldout=heldout))
    if spec.replay_fraction > 0:
        for s in slices[1:]:
            pool = [r for earlier in slices[: s.index - 1] for r in earlier.train]
            n = min(len(pool), round(spec.replay_fraction * len(s.train)))
            s.replay = random.Random(seed + 104729 * s.index).sample(pool, n)
    return slices


@dataclass
class SeriesState:
    """The checkpoint between runs (``series/state.json``)."""

    completed_runs: int = 0
    num_runs: int = 0
    merge_mode: str = "slao"
    slice_names: list[str] = field(default_factory=list)
    loss_matrix: list[list[float | None]] = field(default_factory=list)  # R_loss[t][i], i ≤ t
    accuracy_matrix: list[list[float | None]] = field(default_factory=list)  # exact match, or None
    runs: list[dict[str, Any]] = field(default_factory=list)  # per-run metrics
    loss_history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> SeriesState | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.__dict__)


def series_metrics(state: SeriesState) -> dict[str, Any]:
    """Headline numbers: accuracy-based AA/BWT/forgetting/plasticity where every task has
    reference answers, and the loss-based ones always (``loss_*``: mean held-out loss; for
    loss, BWT < 0 and forgetting > 0 mean the old tasks got worse)."""
    out: dict[str, Any] = {}
    done = state.completed_runs
    if done == 0:
        return out
    lm = [row[:done] for row in state.loss_matrix[:done]]
    for key, value in slao.forgetting_metrics(lm, higher_is_better=False).items():
        out[f"loss_{key}"] = value
    am = [row[:done] for row in state.accuracy_matrix[:done]]
    if all(v is not None for t, row in enumerate(am) for v in row[: t + 1]):
        acc = slao.forgetting_metrics(am)
        out["average_accuracy"] = acc["average"]
        out["backward_transfer"] = acc["backward_transfer"]
        out["forgetting"] = acc["forgetting"]
        out["plasticity"] = acc["plasticity"]
    return out


def _run_spec(spec: SeriesSpec, run: int) -> SeriesSpec:
    """The spec a run's training settings are resolved from: steps_per_run, and a seed per run."""
    train = spec.train.model_copy(update={"seed": spec.train.seed + run - 1})
    if spec.steps_per_run is not None:
        train = train.model_copy(update={"steps": spec.steps_per_run})
    return spec.model_copy(update={"train": train})


def _drop_old_runs(spec: SeriesSpec, job_dir: Path, run: int) -> None:
    """After run ``run`` is committed: earlier merged adapters, fine-tuned ones no merge reads, checkpoints."""
    series_dir = job_dir / SERIES_DIR
    for k in range(1, run):
        shutil.rmtree(series_dir / "merged" / f"run-{k:03d}", ignore_errors=True)
        if spec.merge_mode in ("slao", "sequential"):  # only the last fine-tuned adapter is needed
            shutil.rmtree(series_dir / "finetuned" / f"run-{k:03d}", ignore_errors=True)
    shutil.rmtree(job_dir / CHECKPOINT_DIR / f"run-{run:03d}", ignore_errors=True)


def _open_state(
    spec: SeriesSpec, slices: list[RunSlice], state_path: Path, events: EventWriter
) -> SeriesState:
    """The series' state: a fresh one, or the one a killed series left (checked against this spec)."""
    n_runs = len(slices)
    state = SeriesState.load(state_path)
    if state is None:
        state = SeriesState(num_runs=n_runs, merge_mode=spec.merge_mode, slice_names=[s.name for s in slices])
    elif state.num_runs != n_runs or state.merge_mode != spec.merge_mode:
        raise ValueError(
            f"{state_path} belongs to a series of {state.num_runs} runs ({state.merge_mode}), but this spec makes "
            f"{n_runs} runs ({spec.merge_mode}); use a new job folder for a different series"
        )
    elif done := state.completed_runs:
        events.log(f"resuming the series after run {done} of {n_runs}", completed=done)
    for s in slices:
        events.log(
            f"run {s.index}: {s.name}: {len(s.train)} training rows, {len(s.replay)} replayed, {len(s.heldout)} held out",
            run=s.index,
        )
    return state


@dataclass
class _Series:
    """One series in motion: what its runs share. The model is loaded by the first run this process
    trains; ``finetuned`` (the next run's initialisation) and ``merged`` carry from run to run."""

    spec: SeriesSpec
    job_dir: Path
    events: EventWriter
    device: str
    slices: list[RunSlice]
    state: SeriesState
    writer: bool  # rank 0 (or the only process): the one that writes
    model: Any = None
    tokenizer: Any = None
    heldout: list[HeldoutSet] = field(default_factory=list)
    finetuned: Adapter | None = None
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    merged: Adapter | None = None
    peak_mb: float | None = None  # the last run's peak: the room the next run waits for

    def adapter_dir(self, kind: str, run: int) -> Path:
        return self.job_dir / SERIES_DIR / kind / f"run-{run:03d}"

    def save(self, kind: str, run: int) -> None:
        if self.writer:
            save_adapter(self.model, self.tokenizer, self.adapter_dir(kind, run))

    def wait_for_room(self, run: int, monitor: GpuMonitor | None, guard: ThermalGuard) -> None:
        torch.cuda.empty_cache()
        needed = None
        if self.peak_mb is not None:
            needed = max(0.0, self.peak_mb - torch.cuda.memory_allocated(self.device) / 2**20)
        wait_for_safe_gpu(
            monitor, guard, self.events, before=f"run {run}", needed_free_mb=needed,
            max_wait_s=self.spec.safety.max_pause_s,
        )  # fmt: skip

    def train(self, run: int, cancel_check: Callable[[], bool]) -> tuple[TrainOutcome, int]:
        """Run ``run``'s training, from the last run's fine-tuned adapter; (its outcome, its rows)."""
        spec, s = self.spec, self.slices[run - 1]
        tok, data, resolved = prepare_training(
            _run_spec(spec, run), s.train + s.replay, self.device, self.events
        )
        if self.model is None:
            self.tokenizer = tok
            self.model, _ = load_lora_model(
                spec, self.device, resolved.gradient_checkpointing, self.events, resolved.offload_activations
            )
            self.heldout = [tokenize_heldout(x.heldout, tok, resolved.max_seq_length) for x in self.slices]
            if run > 1:  # resuming: the last finished run's adapters come back from disk
                self.finetuned, self.other = load_factors(self.adapter_dir("finetuned", run - 1), self.device)
                self.merged, _ = load_factors(self.adapter_dir("merged", run - 1), self.device)
            else:
                _, self.other = read_factors(self.model)
        if self.finetuned is not None:
            write_factors(self.model, slao.initial_factors(spec, self.finetuned), self.other)
        outcome = train_adapter(
            self.model, self.tokenizer, data, resolved, device=self.device, events=self.events,
            checkpoint_dir=self.job_dir / CHECKPOINT_DIR / f"run-{run:03d}", cancel_check=cancel_check,
            safety=spec.safety, gpu_index=spec.gpu_index,
            position=RunPosition(run=run, runs=len(self.slices), step_offset=len(self.state.loss_history)),
        )  # fmt: skip
        if outcome.peak_memory_gib is not None:
            self.peak_mb = outcome.peak_memory_gib * 1024
        self.finetuned, self.other = read_factors(self.model)
        return outcome, len(data.input_ids)

    def merge(self, run: int) -> slao.MergeReport:
        """Save the fine-tuned adapter, merge it into the series' adapter, and save that."""
        self.save("finetuned", run)
        history = []  # the ΔW merges read every earlier run's fine-tuned adapter back
        if self.spec.merge_mode in ("linear", "ties", "dare"):
            history = [load_factors(self.adapter_dir("finetuned", k), self.device)[0] for k in range(1, run)]
        assert self.finetuned is not None
        self.merged, report = slao.merge_run(self.spec, run, self.merged, [*history, self.finetuned])
        write_factors(self.model, self.merged, self.other)
        self.save("merged", run)
        return report

    def evaluate_and_commit(
        self, run: int, outcome: TrainOutcome, rows: int, report: slao.MergeReport
    ) -> None:
        """Score the merged adapter on the held-out parts of slices 1..run (row ``run`` of the matrix),
        then commit the run: ``state.json``, the old runs dropped, ``run_finished``."""
        state, n_runs = self.state, len(self.slices)
        scores = [score(self.model, self.tokenizer, self.heldout[i], self.device) for i in range(run)]
        self.model.train()
        row_loss: list[float | None] = [round(loss, 6) for loss, _ in scores]
        row_acc: list[float | None] = [None if acc is None else round(acc, 6) for _, acc in scores]
        state.loss_matrix.append(row_loss + [None] * (n_runs - run))
        state.accuracy_matrix.append(row_acc + [None] * (n_runs - run))
        losses = [h["loss"] for h in outcome.loss_history]
        run_metrics = {
            "run": run,
            "slice": self.slices[run - 1].name,
            "steps": outcome.steps_done,
            "train_rows": rows,
            "replayed_rows": len(self.slices[run - 1].replay),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "heldout_loss": row_loss[-1],
            "heldout_accuracy": row_acc[-1],
            "merge_exact": report.exact,
            "merge_relative_error": round(report.max_relative_error, 6),
            "train_seconds": round(outcome.train_seconds, 2),
        }
        state.runs.append(run_metrics)
        offset = len(state.loss_history)
        self.events.emit(
            Eval(global_step=offset + outcome.steps_done, loss=row_loss[-1], accuracy=row_acc[-1],
                 examples=len(self.heldout[run - 1].input_ids), run=run)
        )  # fmt: skip
        state.loss_history.extend(
            {**h, "run": run, "series_step": offset + k + 1} for k, h in enumerate(outcome.loss_history)
        )
        state.completed_runs = run
        if self.writer:
            state.save(self.job_dir / SERIES_DIR / STATE_FILE)  # the commit point: the run is done
            _drop_old_runs(self.spec, self.job_dir, run)
        self.events.emit(
            RunFinished(
                run=run, runs=n_runs, loss_row=row_loss, accuracy_row=row_acc, metrics=run_metrics,
                series=series_metrics(state), merged_adapter=str(self.adapter_dir("merged", run)),
                finetuned_adapter=str(self.adapter_dir("finetuned", run)),
            )
        )  # fmt: skip


def run_series(
    spec: SeriesSpec, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool] = lambda: False
) -> JobResult:
    """Run (or resume) a series; returns the JobResult whose artifact "adapter" is the merged adapter."""
    job_dir = Path(job_dir)
    device = job_device(spec.device, spec.gpu_index)
    events.stage("loading_data")
    slices = build_slices(spec, [(d.path, load_dataset_logged(d, events)) for d in spec.datasets])
    state = _open_state(spec, slices, job_dir / SERIES_DIR / STATE_FILE, events)
    # On several ranks every rank runs the whole series (training through the same ranks, the same
    # merges, the same evaluation: under FSDP each forward is a collective); rank 0 alone writes.
    writer = (rank := active_rank()) is None or rank.is_writer
    series = _Series(spec, job_dir, events, device, slices, state, writer)
    n_runs = len(slices)
    monitor = GpuMonitor(spec.gpu_index) if device.startswith("cuda") else None
    guard = ThermalGuard(spec.safety)
    try:
        for run in range(state.completed_runs + 1, n_runs + 1):
            if cancel_check():
                raise JobCancelled(f"cancelled before run {run}; runs 1..{run - 1} are saved")
            if run > 1 and device.startswith("cuda"):
                series.wait_for_room(run, monitor, guard)
            events.stage("run", run=run, runs=n_runs, slice=slices[run - 1].name)
            outcome, rows = series.train(run, cancel_check)
            events.stage("merge", run=run, runs=n_runs, merge_mode=spec.merge_mode)
            report = series.merge(run)
            events.stage("evaluate", run=run, runs=n_runs)
            series.evaluate_and_commit(run, outcome, rows, report)
    finally:
        if monitor is not None:
            monitor.close()
    return _result(series)


def _result(series: _Series) -> JobResult:
    """The merged adapter of the last run as the job's adapter, and the series' metrics."""
    spec, state, n_runs = series.spec, series.state, len(series.slices)
    adapter = series.job_dir / ADAPTER_DIR
    if series.writer:
        final = series.adapter_dir("merged", n_runs)
        write_dir_atomically(adapter, lambda tmp: shutil.copytree(final, tmp, dirs_exist_ok=True))
        (adapter / "series.json").write_text(
            json.dumps({"merge_mode": spec.merge_mode, "runs": n_runs, "base_model": spec.model}, indent=2),
            encoding="utf-8",
        )
    metrics: dict[str, Any] = {
        "runs": n_runs,
        "merge_mode": spec.merge_mode,
        "merge_weight": spec.merge_weight,
        "qr_init": spec.qr_init,
        "slices": state.slice_names,
        "loss_matrix": state.loss_matrix,
        "accuracy_matrix": state.accuracy_matrix,
        "per_run": state.runs,
        "device": series.device,
        **series_metrics(state),
    }
    if state.runs:
        metrics["final_loss"] = state.runs[-1]["final_loss"]
    return JobResult(
        status="succeeded",
        kind=spec.kind,
        metrics=metrics,
        artifacts={
            "adapter": str(adapter.resolve()),
            "last_finetuned_adapter": str(series.adapter_dir("finetuned", n_runs).resolve()),
            "evaluation": str((series.job_dir / SERIES_DIR / STATE_FILE).resolve()),
        },
        loss_history=state.loss_history,
    )
