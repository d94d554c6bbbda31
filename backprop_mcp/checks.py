"""Checking what an agent asks for before any job exists: dataset rows, model names, memory fit.

Each check raises ``ToolError`` with what was wrong and what to do, so a bad request creates
nothing. Everything here is torch-free; the engine's torch-free modules (data, models' presets,
defaults, hardware) are imported when a check first needs them, not at server start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError

from backprop_mcp.models import DatasetCheck, TokenStats
from backprop_mcp.paths import looks_like_hub_name, resolve_readable
from engine.spec import FinetuneSpec, SeriesSpec


def validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:8]:
        where = ".".join(str(x) for x in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def dataset_problems(path: str, skip_bad_rows: bool) -> list[str]:
    """Torch-free validation of a dataset before any job exists; raises ToolError when unusable."""
    try:
        from engine.data import inspect_dataset
    except ImportError:  # the engine's data module is part of the same package; keep going without it
        return ["the dataset's rows will be checked by the worker"]
    try:
        report = inspect_dataset(path)
    except Exception as exc:
        raise ToolError(f"dataset {path}: {exc}") from exc
    problems = list(getattr(report, "problems", []) or [])
    rows_ok = int(getattr(report, "rows_ok", 0))
    if rows_ok == 0:
        first = "; ".join(f"line {p.line}: {p.message}" for p in problems[:5])
        raise ToolError(
            f"dataset {path} has no usable rows{(': ' + first) if first else ''}. Each line must be a JSON object "
            'like {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}, '
            '{"prompt": ..., "completion": ...} or {"text": ...}. Fix the file, then call check_dataset.'
        )
    if problems and not skip_bad_rows:
        listed = "; ".join(f"{Path(p.file).name}:{p.line}: {p.message}" for p in problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ToolError(
            f"dataset {path} has {len(problems)} bad row(s): {listed}{more}. Fix them, or pass skip_bad_rows=true "
            f"to train on the {rows_ok} good rows."
        )
    return [f"{len(problems)} bad row(s) will be skipped"] if problems else []


def check_model(model: str) -> str:
    model = model.strip()
    if not model:
        raise ToolError(
            "model is empty; use a preset name (e.g. 'tiny'), a local model folder, or a hub name."
        )
    if model.startswith(("/", "~", ".")) or os.sep in model and not looks_like_hub_name(model):
        folder = resolve_readable(model, "model")
        if not folder.is_dir() or not (
            (folder / "config.json").exists() or (folder / "adapter_config.json").exists()
        ):
            raise ToolError(
                f"model: {folder} is not a model folder (no config.json). Give a folder saved with "
                "save_pretrained, a preset name such as 'tiny', or a hub name like 'Qwen/Qwen2.5-0.5B-Instruct'."
            )
        return str(folder)
    if "/" not in model:
        import difflib

        from engine.models import PRESETS, get_preset

        close = difflib.get_close_matches(model.lower(), list(PRESETS), n=3, cutoff=0.75)
        if get_preset(model) is None and close:
            # Most likely a typo of a preset; a real hub model without an owner (e.g. 'gpt2') has no
            # close preset name and passes through to the worker.
            raise ToolError(
                f"model {model!r} is not a preset; did you mean {' or '.join(repr(c) for c in close)}? "
                f"Presets: {', '.join(PRESETS)}. A hub model is named 'owner/name'."
            )
    return model


def dataset_path(path: str) -> str:
    if looks_like_hub_name(path.strip()) and not Path(path.strip()).expanduser().exists():
        return path.strip()  # a hub dataset name: the worker downloads it
    return str(resolve_readable(path, "dataset_path"))


def model_shape(model: str) -> Any:
    """The architecture of a preset or a local folder (config.json), without torch; None if unknown here."""
    from engine.models import get_preset, shape_from_config

    preset = get_preset(model)
    if preset is not None:
        return preset.shape
    config = Path(model) / "config.json"
    if config.is_file():
        try:
            return shape_from_config(json.loads(config.read_text(encoding="utf-8")), str(config))
        except (ValueError, KeyError, TypeError):
            return None
    return None


def fit_notes(spec: FinetuneSpec | SeriesSpec) -> list[str]:
    """Refuse, before any job exists, a model that cannot fit on the chosen GPU even at micro-batch 1.

    Only with a GPU and a known architecture (preset or local folder); a hub model's shape would need
    a download, so the worker checks it with the real model instead. Token lengths are not known
    here, so the check uses the sequence length given (default 2048, the preset's context if shorter).
    """
    if spec.device == "cpu":
        return []
    from engine.hardware import probe_gpus
    from engine.memory import estimate_memory, largest_micro_batch

    probe = probe_gpus()
    if not probe.available:
        return ["no GPU found: training runs on the CPU (fine for the 'tiny' preset and very small models)"]
    card = next((g for g in probe.gpus if g.index == spec.gpu_index), None)
    if card is None:
        raise ToolError(
            f"gpu_index={spec.gpu_index} but this machine has GPU(s) {[g.index for g in probe.gpus]}; "
            "call inspect_gpu and pick one of them."
        )
    shape = model_shape(spec.model)
    if shape is None:
        return ["memory fit will be checked by the worker once the model's configuration is downloaded"]
    quant = "4bit" if spec.quantization == "auto" else spec.quantization
    seq = spec.train.max_seq_length or min(2048, shape.max_context or 2048)
    free = card.memory_free_mb / 1024
    kwargs: dict[str, Any] = {"device": "cuda", "bf16_supported": card.bf16_supported}
    if largest_micro_batch(shape, quant, spec.lora.rank, seq, free, limit=1, **kwargs) == 0:
        need = estimate_memory(shape, quant, spec.lora.rank, 1, seq, **kwargs).total_gib
        raise ToolError(
            f"{spec.model} does not fit on GPU {card.index} ({card.name}): LoRA training with {quant} weights, "
            f"{seq}-token sequences needs about {need:.1f} GiB and {free:.1f} GiB is free. Use quantization='4bit', "
            "a shorter max_seq_length, a smaller lora_rank or a smaller model, or free the GPU (inspect_gpu)."
        )
    return []


def dataset_check_result(path: str, out: dict[str, Any]) -> DatasetCheck:
    report = out.get("report") or {}
    problems = [str(p) for p in (report.get("problems") or [])]
    rows_ok = int(report.get("rows_ok", 0))
    fits = out.get("fits")
    ready = rows_ok > 0 and not problems and fits is not False
    if rows_ok == 0:
        next_step = "No usable rows: fix the format (see problems) and check again."
    elif problems:
        next_step = (
            "Fix the bad rows listed, or start_finetune with skip_bad_rows=true to train on the good ones."
        )
    elif fits is False:
        next_step = (
            "It does not fit as configured: lower max_seq_length or micro_batch_size, or use a smaller model."
        )
    else:
        next_step = (
            f"Ready: start_finetune(dataset_path='{path}', ...) with these defaults or your own settings."
        )
    tokens = out.get("tokens")
    return DatasetCheck(
        path=path,
        format=report.get("format"),
        rows_total=int(report.get("rows_total", 0)),
        rows_ok=rows_ok,
        skipped=int(report.get("skipped", 0)),
        bad_rows=int(report.get("bad_rows", len(problems))),
        problems=problems,
        tokens=TokenStats.model_validate(tokens) if tokens else None,
        fits=fits,
        fit_error=out.get("fit_error"),
        defaults=out.get("defaults"),
        reasons=out.get("reasons"),
        memory_estimate_gib=out.get("memory_estimate_gib"),
        device=out.get("device"),
        ready=ready,
        next_step=next_step,
    )
