"""What an export starts from: a finished job folder, an adapter folder, or a full model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from engine.contract.files import PathError, checked_path, user_path
from engine.contract.spec import RESULT_FILE, SPEC_FILE, ExportSpec, read_result, read_spec
from engine.models.adapters import ADAPTER_CONFIG, is_adapter_folder, read_adapter_config
from engine.models.presets import resolve_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class SourceError(ValueError):
    """The export source is unusable; the message says why and what to do."""


@dataclass
class ExportSource:
    base_name: str  # the base model as the job/adapter named it (preset, folder or hub id)
    base_dir: Path  # a local Hugging Face folder with config.json + safetensors
    adapter_dir: Path | None  # None: export the model folder as it is
    tokenizer_dir: Path  # the adapter's own tokenizer (it may carry the training chat template) or the base's
    name: str  # a default model name (job folder or adapter folder name)


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in _TOKENIZER_FILES)


def local_model_dir(name: str) -> Path:
    """A local folder for a preset, folder or hub name (hub: from the local cache, or downloaded)."""
    try:
        path = user_path(name, "base model")
        if (path / "config.json").is_file():
            return checked_path(path, "base model", expect="dir")
    except (PathError, OSError) as exc:  # OSError: a name too long for the file system
        raise SourceError(str(exc)) from None
    try:
        resolved = resolve_model(name)
    except Exception as e:
        raise SourceError(f"cannot find the base model {name!r}: {e}") from e
    if resolved.local_path is not None:
        return resolved.local_path
    try:
        return Path(snapshot_download(resolved.target, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise SourceError(
            f"the base model {resolved.target!r} is not on this machine and could not be downloaded ({e}); "
            "download it once with network access, or pass base_model= a local folder"
        ) from e


def resolve_source(spec: ExportSpec) -> ExportSource:
    try:  # by type, before anything opens it
        src = checked_path(spec.source, "export source", expect="dir")
    except PathError as exc:
        raise SourceError(f"{exc} Give a job folder or an adapter folder.") from None
    if (src / SPEC_FILE).is_file():
        return _from_job(src, spec)
    if is_adapter_folder(src):
        base = spec.base_model or read_adapter_config(src).get("base_model_name_or_path")
        if not base:
            raise SourceError(f"{src}/{ADAPTER_CONFIG} does not name its base model; pass base_model=")
        return _with_adapter(base, src, src.name)
    if (src / "config.json").is_file():
        return ExportSource(
            base_name=str(src), base_dir=src, adapter_dir=None, tokenizer_dir=src, name=src.name
        )
    raise SourceError(
        f"{src} is neither a job folder (spec.json), an adapter folder (adapter_config.json) "
        "nor a model folder (config.json)"
    )


def _from_job(job_dir: Path, spec: ExportSpec) -> ExportSource:
    job_spec = read_spec(job_dir)
    if job_spec.kind == "export":
        raise SourceError(f"{job_dir} is an export job; export the training job it came from")
    result = read_result(job_dir)
    if result is None:
        raise SourceError(
            f"job {job_dir.name} has not finished ({RESULT_FILE} is missing); wait for it to end"
        )
    if result.status != "succeeded":
        raise SourceError(f"job {job_dir.name} ended {result.status}; only a succeeded job can be exported")
    adapter = result.artifacts.get("adapter")
    if not adapter or not is_adapter_folder(adapter):
        raise SourceError(
            f"job {job_dir.name} has no adapter artifact to export (result.json artifacts: {result.artifacts})"
        )
    base = spec.base_model or job_spec.model
    return _with_adapter(base, Path(adapter), job_dir.name)


def _with_adapter(base: str, adapter_dir: Path, name: str) -> ExportSource:
    base_dir = local_model_dir(base)
    tokenizer_dir = adapter_dir if _has_tokenizer(adapter_dir) else base_dir
    return ExportSource(
        base_name=base, base_dir=base_dir, adapter_dir=adapter_dir, tokenizer_dir=tokenizer_dir, name=name
    )
