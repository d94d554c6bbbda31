"""The export job: merge -> convert -> quantize -> verify -> register, with a stage event for each.

Files are made in ``<job_dir>/gguf/``: ``<name>-<quant>.gguf`` per quantization, ``<name>-lora.gguf``
when asked, and a ``Modelfile``. With ``output_dir`` the verified files are then moved there (whole
or not at all) and the Modelfile is written beside them. An export that fails verification is
renamed ``*.gguf.rejected`` in the job folder (kept for inspection, never listed as an artifact,
never moved to ``output_dir``) and the job fails.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from engine.contract.errors import JobCancelled
from engine.contract.events import EventWriter, Progress
from engine.contract.files import move_into
from engine.contract.spec import ExportSpec, JobResult
from engine.export.adapter_gguf import convert_adapter_to_gguf
from engine.export.convert import convert_to_gguf, default_outtype, read_config
from engine.export.merge import LoraMerger, load_lora
from engine.export.ollama import (
    MODELFILE,
    OllamaError,
    default_model_name,
    modelfile_text,
    register,
    write_modelfile,
)
from engine.export.quantize import FLOAT_TYPES, copy_or_link, quantize_gguf
from engine.export.source import ExportSource, resolve_source
from engine.export.templates import TemplateNotRecognised, ollama_template_for
from engine.export.verify import check_parity, load_reference

GGUF_DIR = "gguf"
_STAGE_TEXT = {
    "merge": "reading the adapter and the base model",
    "convert": "merging the LoRA and converting to GGUF",
    "quantize": "quantizing",
    "verify": "comparing llama.cpp with transformers",
    "register": "writing the Modelfile / registering with Ollama",
}


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _file_entry(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    return {"path": str(path), "bytes": size, "human": human_size(size)}


def _progress(events: EventWriter, stage: str) -> Callable[[int, int, str], None]:
    last = [0.0]

    def report(i: int, n: int, name: str) -> None:
        now = time.monotonic()
        if i == n or now - last[0] >= 1.0:
            last[0] = now
            events.emit(Progress(stage=stage, step=i, total=n, item=name))

    return report


def run_export(
    spec: ExportSpec, job_dir: Path, events: EventWriter, cancel_check: Callable[[], bool] = lambda: False
) -> JobResult:
    """Run an export job (the worker calls this for kind "export")."""
    export = _Export(spec, Path(job_dir) / GGUF_DIR, events, cancel_check)
    try:
        return export.run()
    except JobCancelled as e:  # a result of its own: the files made so far are kept and listed
        return JobResult(
            status="cancelled",
            kind="export",
            metrics=export.metrics,
            artifacts=export.artifacts,
            error={"type": "Cancelled", "message": str(e)},
        )


@dataclass
class _Export:
    """One export in motion: its settings, where its files go, and the metrics and artifacts so far."""

    spec: ExportSpec
    out_dir: Path
    events: EventWriter
    cancel_check: Callable[[], bool]
    metrics: dict[str, Any] = field(default_factory=lambda: {"stage_seconds": {}})
    artifacts: dict[str, str] = field(default_factory=dict)

    def check_cancel(self) -> None:
        if self.cancel_check():
            raise JobCancelled("export cancelled between stages")

    @contextmanager
    def stage(self, name: str, **data: Any) -> Iterator[None]:
        """A stage event, then the stage's seconds in ``metrics`` once it ends."""
        self.events.stage(name, message=f"{name}: {_STAGE_TEXT[name]}", **data)
        t0 = time.monotonic()
        yield
        self.metrics["stage_seconds"][name] = round(time.monotonic() - t0, 2)

    def run(self) -> JobResult:
        spec, metrics = self.spec, self.metrics
        self.out_dir.mkdir(parents=True, exist_ok=True)
        final_dir = _output_dir(spec)  # refused now, not after an hour of converting
        with self.stage("merge", source=spec.source):
            source = resolve_source(spec)
            merger = load_lora(source.adapter_dir) if source.adapter_dir is not None else None
            model_name = default_model_name(spec.ollama_name or source.name)
            metrics["base_model"] = source.base_name
            metrics["adapter"] = str(source.adapter_dir) if source.adapter_dir else None
            if merger is not None:
                self.events.log(
                    f"merging {len(merger.pairs)} LoRA weight(s) into {source.base_name} while converting (fp32 add)"
                )
        self.check_cancel()
        file_stem = model_name.replace(":", "-").replace("/", "-")
        intermediate, outtype = self.convert(source, merger, model_name, file_stem)
        self.check_cancel()
        files = self.quantize(source, merger, intermediate, outtype, file_stem)
        self.check_cancel()
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.tokenizer_dir), trust_remote_code=spec.trust_remote_code
        )
        if (rejected := self.verify(source, tokenizer, files)) is not None:
            return rejected
        self.check_cancel()
        if final_dir is not None:
            _publish(files, self.artifacts, metrics, final_dir)
            self.events.log(f"GGUF files moved to {final_dir}")
        shipped = [q for q in spec.quantizations if q in files]
        # The file Ollama gets: q4_k_m when made (Ollama's usual default), else the first quantized one.
        main_quant = (
            "q4_k_m"
            if "q4_k_m" in shipped
            else next((q for q in shipped if q not in FLOAT_TYPES), shipped[0])
        )
        return self.register(tokenizer, files[main_quant], model_name)

    def convert(
        self, source: ExportSource, merger: LoraMerger | None, name: str, file_stem: str
    ) -> tuple[Path, str]:
        """The model (the LoRA merged in) as one GGUF at its own precision, the quantizations' source."""
        outtype = default_outtype(read_config(source.base_dir))
        with self.stage("convert", outtype=outtype):
            intermediate = self.out_dir / f"{file_stem}-{outtype}.intermediate.gguf"
            conv = convert_to_gguf(
                source.base_dir,
                intermediate,
                outtype=outtype,
                merger=merger,
                tokenizer_dir=source.tokenizer_dir,
                name=name,
                on_tensor=_progress(self.events, "convert"),
            )
            self.metrics["convert"] = {
                "arch": conv.arch,
                "outtype": conv.outtype,
                "tensors": conv.n_tensors,
                "params": conv.n_params,
                "merged_tensors": conv.merged_tensors,
                "tokenizer": conv.vocab.model,
                "pre_tokenizer": conv.vocab.pre,
            }
        return intermediate, outtype

    def quantize(
        self,
        source: ExportSource,
        merger: LoraMerger | None,
        intermediate: Path,
        outtype: str,
        file_stem: str,
    ) -> dict[str, Path]:
        """One file per quantization asked for (the intermediate itself where it is one), and the
        adapter as a GGUF of its own when asked."""
        quants = self.spec.quantizations
        with self.stage("quantize", quantizations=list(quants)):
            files: dict[str, Path] = {}
            sizes: dict[str, dict[str, Any]] = {}
            for i, quant in enumerate(quants):
                files[quant] = target = self.out_dir / f"{file_stem}-{quant}.gguf"
                if quant == outtype:
                    copy_or_link(intermediate, target)
                else:
                    quantize_gguf(intermediate, target, quant)
                sizes[quant] = _file_entry(target)
                self.events.emit(Progress(stage="quantize", step=i + 1, total=len(quants), item=quant))
                self.check_cancel()
            intermediate.unlink(missing_ok=True)
            self.metrics["files"] = sizes
            if self.spec.adapter_gguf:
                if merger is None:
                    raise ValueError(
                        "adapter_gguf needs a LoRA source (a job or an adapter folder), not a full model"
                    )
                adapter = convert_adapter_to_gguf(
                    merger, source.base_dir, self.out_dir / f"{file_stem}-lora.gguf"
                )
                self.artifacts["adapter_gguf"] = str(adapter)
                sizes["adapter"] = _file_entry(adapter)
        return files

    def verify(self, source: ExportSource, tokenizer: Any, files: dict[str, Path]) -> JobResult | None:
        """Compare each file with transformers; the ones that disagree are renamed ``*.rejected`` and
        the job fails (its result returned here), the others become artifacts."""
        failed: list[str] = []
        if self.spec.verify:
            with self.stage("verify", quantizations=list(files)):
                failed = self.parity(source, tokenizer, files)
        else:
            self.events.warning(
                "verification skipped (verify=false): the GGUF files were not compared with transformers"
            )
        for quant, path in files.items():
            if quant in failed:
                path.replace(path.with_name(path.name + ".rejected"))
            else:
                self.artifacts[f"gguf_{quant}"] = str(path)
        if not failed:
            return None
        reports = self.metrics.get("parity", {})
        msg = "; ".join(reports[q]["message"] for q in failed if q in reports)
        return JobResult(
            status="failed",
            kind="export",
            metrics=self.metrics,
            artifacts=self.artifacts,
            error={
                "type": "VerificationFailed",
                "message": f"the GGUF export does not reproduce the model ({msg}); "
                "the file(s) were renamed *.rejected. Try a higher-precision quantization (q8_0 or f16).",
            },
        )

    def parity(self, source: ExportSource, tokenizer: Any, files: dict[str, Path]) -> list[str]:
        """The quantizations whose file disagrees with transformers (each one's report in ``metrics``)."""
        spec, events = self.spec, self.events
        model = load_reference(source.base_dir, source.adapter_dir, trust_remote_code=spec.trust_remote_code)
        failed: list[str] = []
        self.metrics["parity"] = {}
        try:
            for i, (quant, path) in enumerate(files.items()):
                report = check_parity(path, quant, model, tokenizer)
                self.metrics["parity"][quant] = report.to_dict()
                events.emit(Progress(stage="verify", step=i + 1, total=len(files), item=quant))
                events.log(report.message)
                if not report.tokenizer_match:
                    events.warning(
                        f"{quant}: llama.cpp tokenizes the check prompts differently from transformers"
                    )
                if not report.passed:
                    failed.append(quant)
                self.check_cancel()
        finally:
            del model
            gc.collect()
        return failed

    def register(self, tokenizer: Any, gguf_path: Path, model_name: str) -> JobResult:
        """The Modelfile beside the file Ollama gets, and the model registered with Ollama when asked."""
        spec, events, metrics = self.spec, self.events, self.metrics
        with self.stage("register", ollama=spec.register_ollama, model=model_name):
            template = None
            try:
                template = ollama_template_for(tokenizer)
                metrics["chat_format"] = template.family
            except TemplateNotRecognised as e:
                events.warning(str(e))
                metrics["chat_format"] = None
            modelfile = write_modelfile(
                gguf_path.parent / MODELFILE,
                modelfile_text(gguf_path, template, system=spec.system_prompt, relative_to=gguf_path.parent),
            )
            self.artifacts["modelfile"] = str(modelfile)
            metrics["ollama_model"] = model_name
            metrics["ollama_create"] = f"ollama create {model_name} -f {modelfile}"
            status: Any = "succeeded"
            error = None
            if spec.register_ollama:
                try:
                    reg = register(
                        model_name,
                        gguf_path,
                        modelfile,
                        template,
                        system=spec.system_prompt,
                        host=spec.ollama_host,
                    )
                    metrics["ollama_run"] = reg.run_command
                    metrics["ollama_registered_via"] = reg.method
                    events.log(f"registered with Ollama: {reg.run_command}")
                except OllamaError as e:
                    status = "failed"
                    error = {"type": "OllamaUnavailable", "message": str(e)}
            else:
                metrics["ollama_run"] = f"ollama run {model_name}"
        # built last: JobResult copies the dicts it is given
        return JobResult(status=status, kind="export", metrics=metrics, artifacts=self.artifacts, error=error)


def _output_dir(spec: ExportSpec) -> Path | None:
    """The user's folder for the files, created and checked writable up front (None: the job folder)."""
    if not spec.output_dir:
        return None
    folder = Path(spec.output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".backprop-write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise OSError(
            f"cannot write the GGUF files to {folder}: {e.strerror or e}; choose another output_dir"
        ) from e
    return folder.resolve()


def _publish(
    files: dict[str, Path], artifacts: dict[str, str], metrics: dict[str, Any], folder: Path
) -> None:
    """Move the verified files (and the adapter GGUF) into ``folder``; every record follows them."""
    for quant, path in list(files.items()):
        if artifacts.get(f"gguf_{quant}") != str(path):
            continue  # rejected: stays in the job folder
        files[quant] = move_into(path, folder)
        artifacts[f"gguf_{quant}"] = metrics["files"][quant]["path"] = str(files[quant])
    if "adapter_gguf" in artifacts:
        moved = move_into(artifacts["adapter_gguf"], folder)
        artifacts["adapter_gguf"] = metrics["files"]["adapter"]["path"] = str(moved)
