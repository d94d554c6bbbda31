"""Checking what an agent asks for before any job exists, as tool errors.

The checks themselves are the engine's preflight (``engine.planning.preflight``, torch-free), the same
that the CLI, the Python API and the worker run, so a job the server accepts is one the worker
accepts; this module turns their refusals and pydantic's into ``ToolError``s an agent can act on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ValidationError

from backprop_mcp.paths import JOB_ID_RE, looks_like_hub_name, resolve_readable
from backprop_mcp.store import JobRecord
from backprop_mcp.tool_outputs import DatasetCheck
from engine.interface import (
    DataCheck,
    ExportSpec,
    FinetuneSpec,
    PreflightError,
    SeriesSpec,
    check_model,
    problems,
    quoted,
)
from engine.interface import preflight as run_preflight

_Spec = TypeVar("_Spec", bound=BaseModel)
JobSpec = FinetuneSpec | SeriesSpec | ExportSpec


def validated(build: Callable[..., _Spec], what: str, *args: Any, **settings: Any) -> _Spec:
    """``build(*args, **settings)`` (a spec model or ``training_spec``); pydantic's refusal becomes a tool error."""
    try:
        return build(*args, **settings)
    except ValidationError as exc:
        raise ToolError(f"invalid {what}: {'; '.join(problems(exc)[:8])}. Fix them and call again.") from exc


def trained_job(record: JobRecord, tool: str, otherwise: str = "") -> None:
    """Refuse a job that is not a succeeded fine-tune or series (what ``tool`` builds on)."""
    if not record.trained:
        raise ToolError(
            f"job {record.id} is a {record.kind} job in state '{record.state}'; {tool} needs a succeeded "
            f"fine-tune or SLAO series job.{otherwise}"
        )


def adapter_folder(path: str) -> Path:
    folder = resolve_readable(path, "adapter_path")
    if not (folder / "adapter_config.json").exists():
        raise ToolError(
            f"adapter_path: {quoted(folder)} has no adapter_config.json; give a PEFT adapter folder."
        )
    return folder


def preflight(spec: JobSpec) -> list[str]:
    """The engine's preflight (the same the CLI and the worker run); its refusals become tool errors."""
    try:
        return run_preflight(spec, "tool")
    except PreflightError as exc:
        raise ToolError(f"{exc} Nothing was started.") from None


def initial_adapter(value: str, find_job: Callable[[str], JobRecord]) -> str:
    """A tool's init_adapter: a succeeded training job's id (its folder, whose adapter the engine takes), or
    an absolute path the file policy lets tools read (an adapter folder or a finished job's folder)."""
    text = value.strip()
    if JOB_ID_RE.match(text):
        record = find_job(text)
        trained_job(record, "init_adapter")
        return str(record.job_dir)
    return str(resolve_readable(text, "init_adapter"))


def permitted_model(model: str) -> str:
    """A tool's model argument: a folder only where the file policy lets tools read (a name passes as it
    is), then the engine's ``check_model`` (its PreflightError reaches the model as a tool error, tool_errors.py)."""
    text = model.strip()
    if text.startswith(("/", "~", ".")) or (os.sep in text and not looks_like_hub_name(text)):
        model = str(resolve_readable(text, "model"))  # a folder: the file policy and type check first
    return check_model(model)


def dataset_path(path: str) -> str:
    if looks_like_hub_name(path.strip()) and not Path(path.strip()).expanduser().exists():
        return path.strip()  # a hub dataset name: the worker downloads it
    return str(resolve_readable(path, "dataset_path"))


def dataset_check_result(path: str, out: dict[str, Any]) -> DatasetCheck:
    check = DataCheck.model_validate(out)
    report = check.report
    problems = [str(p) for p in (report.get("problems") or [])]
    if not report.get("rows_ok"):
        next_step = "No usable rows: fix the format (see problems) and check again."
    elif check.method_problem:
        next_step = f"{check.method_problem}. Give data in the method's format, or another method."
    elif report.get("bad_rows"):
        next_step = (
            "Fix the bad rows listed, or start_finetune with skip_bad_rows=true to train on the good ones."
        )
    elif check.fits is False:
        next_step = (
            "It does not fit as configured: lower max_seq_length or micro_batch_size, or use a smaller model."
        )
    else:
        method = f", method='{check.method}'" if check.method not in (None, "sft") else ""
        next_step = f"Ready: start_finetune(dataset_path='{path}'{method}, ...) with these defaults or your own settings."
    return DatasetCheck(
        **check.model_dump(exclude={"report"}),
        path=path,
        format=report.get("format"),
        rows_total=int(report.get("rows_total", 0)),
        rows_ok=int(report.get("rows_ok", 0)),
        skipped=int(report.get("skipped", 0)),
        bad_rows=int(report.get("bad_rows", len(problems))),
        problems=problems,
        ready=check.ready,
        next_step=next_step,
    )
