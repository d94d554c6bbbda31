"""The Python API: the same jobs the server and the CLI run, in three lines.

    from engine import Trainer
    result = Trainer("tiny").train("examples/data/chat.jsonl", steps=30)
    result.save("my-adapter")

Each call creates a job folder (under ``$BACKPROP_HOME/jobs`` or ``workdir``) and runs it in a
child process (``python -m engine run``), exactly as a server job runs: a crash in a CUDA kernel
cannot take the caller down, and the job folder keeps the events, checkpoints and artifacts.
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engine.contract.files import local_or_name
from engine.contract.settings import setting_parameters, training_spec
from engine.contract.spec import ExportSpec, FinetuneSpec, JobResult, SeriesSpec
from engine.hardware.installed import require_for_spec
from engine.jobs.progress import ProgressPrinter
from engine.jobs.runner import create_job, init_adapter_path, run_and_follow
from engine.planning.preflight import preflight


class JobFailed(RuntimeError):
    def __init__(self, result: JobResult, job_dir: Path):
        err = result.error or {}
        super().__init__(
            f"{err.get('type', 'Error')}: {err.get('message', result.status)} (job folder: {job_dir})"
        )
        self.result = result
        self.job_dir = job_dir


@dataclass(repr=False)
class TrainResult:
    job_dir: Path
    adapter_path: Path | None
    metrics: dict[str, Any]
    loss_history: list[dict[str, float]]
    artifacts: dict[str, str] = field(default_factory=dict)
    raw: JobResult | None = None

    def __repr__(self) -> str:
        """One line: the job, its headline numbers and where the result is (the rest is in the fields)."""
        m = self.metrics
        parts = [f"job={self.job_dir.name!r}"]
        if isinstance(m.get("first_loss"), float) and isinstance(m.get("final_loss"), float):
            parts.append(f"loss={m['first_loss']:.4g}->{m['final_loss']:.4g}")
        for key, name in (("steps", "steps"), ("runs", "runs"), ("train_seconds", "seconds")):
            if m.get(key) is not None:
                parts.append(f"{name}={m[key]}")
        if self.adapter_path is not None:
            parts.append(f"adapter={str(self.adapter_path)!r}")
        files = [p for k, p in self.artifacts.items() if k.startswith("gguf_")]
        if files:
            parts.append(f"gguf={files!r}")
        return f"TrainResult({', '.join(parts)})"

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.loss_history]

    def save(self, path: str | Path) -> Path:
        """Copy the adapter (a standard PEFT adapter folder) to ``path``."""
        if self.adapter_path is None:
            raise ValueError("this job produced no adapter")
        dest = Path(path)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(self.adapter_path, dest)
        return dest


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _takes_settings(job: type[FinetuneSpec] | type[SeriesSpec]) -> Callable[[_Method], _Method]:
    """The method's signature (``help``, ``inspect``, completion) lists ``job``'s settings as keywords, each with
    its type, bounds, description and default from the spec; the method takes them in its ``**settings``
    (last) and names any it takes itself (``model``)."""

    def declare(method: _Method) -> _Method:
        own, spec = inspect.signature(method), {p.name: p for p in setting_parameters(job)}
        named = [spec[p.name].replace(kind=p.kind) if p.name in spec else p for p in own.parameters.values()]
        settings = [p for name, p in spec.items() if name not in own.parameters]
        method.__signature__ = own.replace(parameters=[*named[:-1], *settings])  # type: ignore[attr-defined]
        return method

    return declare


class Trainer:
    """Fine-tune ``model`` (a preset such as ``"tiny"`` or ``"qwen2.5-7b"``, a folder, or a hub name).

    ``settings`` are any of ``engine.contract.settings.settings_of(FinetuneSpec)`` (``quantization``, ``lora_rank``,
    ``device``, ``gpus``, ``parallel``, ``learning_rate``, ...): the defaults of every job this trainer
    runs, which ``train`` and ``multi_run`` can override. They are checked here, at once.
    """

    @_takes_settings(FinetuneSpec)
    def __init__(
        self,
        model: str | None = None,
        *,
        workdir: str | Path | None = None,
        verbose: bool = True,
        **settings: Any,
    ):
        training_spec(FinetuneSpec, "", model=model, **settings)  # TypeError / ValidationError now, not later
        self.settings = {"model": model, **settings}  # model None: the spec's default
        self.workdir = Path(workdir) if workdir else None
        self.verbose = verbose
        self.last: TrainResult | None = None

    def _run(self, spec: Any) -> TrainResult:
        require_for_spec(spec, "Trainer." + ("export" if spec.kind == "export" else "train"))  # MissingExtra
        preflight(spec, "python")  # raises PreflightError (a ValueError) before any job folder exists
        job_dir = create_job(spec, root=self.workdir)
        with ProgressPrinter(enabled=self.verbose) as printer:
            result = run_and_follow(job_dir, printer)
        if result.status != "succeeded":
            raise JobFailed(result, job_dir)
        adapter = result.artifacts.get("adapter")
        return TrainResult(
            job_dir,
            Path(adapter) if adapter else None,
            result.metrics,
            result.loss_history,
            result.artifacts,
            result,
        )

    @_takes_settings(FinetuneSpec)
    def train(self, data: str | Path, **settings: Any) -> TrainResult:
        """One LoRA/QLoRA fine-tune. ``settings``: as the constructor's (steps, learning_rate, skip_bad_rows, ...)."""
        given = {**self.settings, **settings}
        if given.get("init_adapter"):  # a finished job's id (under workdir or the state folder) or a folder
            given["init_adapter"] = init_adapter_path(str(given["init_adapter"]), self.workdir)
        spec = training_spec(FinetuneSpec, local_or_name(data), **given)
        self.last = self._run(spec)
        return self.last

    @_takes_settings(SeriesSpec)
    def multi_run(self, dataset: str | Path | list[str | Path], **settings: Any) -> TrainResult:
        """A SLAO series: one dataset cut into ``num_runs`` slices, or a list of datasets (one per task).

        ``settings``: the constructor's and the series' (``num_runs``, ``steps_per_run``,
        ``samples_per_run``, ``merge_mode``, ...: ``settings_of(SeriesSpec)``). The result's adapter
        is the merged adapter; ``metrics`` holds the evaluation matrix and average accuracy /
        backward transfer / forgetting / plasticity.
        """
        paths = [local_or_name(p) for p in (dataset if isinstance(dataset, list) else [dataset])]
        self.last = self._run(training_spec(SeriesSpec, paths, **{**self.settings, **settings}))
        return self.last

    def export(
        self,
        format: str = "gguf",
        *,
        quantization: str | list[str] = "q4_k_m",
        model_name: str | None = None,
        source: str | Path | None = None,
        **settings: Any,
    ) -> TrainResult:
        """Merge the last trained adapter (or ``source``) into its base and write verified GGUF files.

        ``model_name`` is the name in Ollama; ``settings`` are ExportSpec's (``register_ollama``,
        ``output_dir``: where the files and the Modelfile go, else the export job's ``gguf/``,
        ``adapter_gguf``, ``base_model``, ``system_prompt``, ``verify``, ...).
        """
        if format != "gguf":
            raise ValueError(f"unknown export format {format!r}; only 'gguf' is supported")
        if source is None:
            if self.last is None:
                raise ValueError("nothing to export yet: call train() or multi_run() first, or pass source=")
            source = self.last.job_dir
        if settings.get("output_dir"):
            settings["output_dir"] = str(Path(settings["output_dir"]).expanduser().resolve())
        quants = [quantization] if isinstance(quantization, str) else list(quantization)
        spec = ExportSpec(
            source=str(Path(source).resolve()), quantizations=quants, ollama_name=model_name, **settings
        )
        return self._run(spec)

    def save(self, path: str | Path) -> Path:
        if self.last is None:
            raise ValueError("nothing to save yet: call train() first")
        return self.last.save(path)
