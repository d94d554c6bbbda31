"""The ``backprop`` command line.

Parsing needs only the standard library and the job spec's models (pydantic, no torch), so
``backprop --help`` answers at once: a training command's setting flags are made from the spec's
fields (name, type, bounds' refusals, description), so they cannot drift from what a job takes.
Each command imports what it needs when it runs. Training commands run the job in a child process
and draw a live progress bar from its events (Ctrl-C stops the job cleanly, with a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.contract.files import local_or_name

if TYPE_CHECKING:
    from pydantic import BaseModel

# Short spellings kept beside the flags generated from the settings' names.
_ALIASES = {
    "learning_rate": ["--lr"],
    "max_seq_length": ["--seq-len"],
    "micro_batch_size": ["--batch"],
    "gradient_accumulation": ["--grad-accum"],
    "lora_rank": ["--rank"],
    "lora_alpha": ["--alpha"],
    "quantizations": ["--quantization"],
    "register_ollama": ["--ollama"],
}
# Settings with a flag of their own (its parsing), or not settable from the command line.
_OWN_FLAGS = {"gpus", "lora_target_modules"}
# The setting groups of --help, in this order (a section not named here is titled by its name).
_TITLES = {
    "train": "training",
    "lora": "LoRA",
    None: "job",
    "dataset": "dataset",
    "safety": "GPU temperature",
    "preference": "preference tuning (dpo, kto, orpo)",
    "grpo": "GRPO (method grpo)",
}


def _add_settings(p: argparse.ArgumentParser, job: Any, own: str = "job") -> None:
    """A command's setting flags: one per setting of ``job`` (engine.contract.settings), grouped by section."""
    from engine.contract.settings import setting_home, settings_of

    groups = {s: p.add_argument_group(f"{own if s is None else t} settings") for s, t in _TITLES.items()}
    for name in settings_of(job):
        section, _, info = setting_home(name, job)
        group = groups.get(section) or groups.setdefault(section, p.add_argument_group(f"{section} settings"))
        if name == "gpus":
            group.add_argument(
                "--gpus",
                type=_gpus,
                default=None,
                help="train on several GPUs at once: card indices (--gpus 0,1) or --gpus all; one index picks that card",
            )
        elif name not in _OWN_FLAGS:
            _add_setting(group, name, info)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workdir", type=Path, default=None, help="where job folders go (default $BACKPROP_HOME/jobs)"
    )
    _add_json(p)


def _add_setting(group: Any, name: str, info: Any) -> None:
    """One setting's flag: its type, choices and help from the spec's field; unset means the spec's default."""
    from types import UnionType
    from typing import Literal, Union, get_args, get_origin

    kind = info.annotation  # X or X | None
    if get_origin(kind) in (Union, UnionType):
        kind = next(t for t in get_args(kind) if t is not type(None))
    options = get_args(kind)
    default = info.get_default(call_default_factory=True)
    shown = ", ".join(default) if isinstance(default, list) else default
    text = (info.description or "").replace("%", "%%") + (
        f" (default {shown})" if shown not in (None, "") else ""
    )
    flags = ["--" + name.replace("_", "-"), *_ALIASES.get(name, [])]
    extra: dict[str, Any] = {"type": kind}
    if kind is bool:
        extra = {"action": argparse.BooleanOptionalAction}
    elif get_origin(kind) is Literal:
        extra = {"choices": list(options)}
    elif get_origin(kind) is list and get_origin(options[0]) is Literal:  # report_to, quantizations
        extra = {"action": "append", "choices": get_args(options[0]), "metavar": name.upper()}
        text = f"{text}; one of {', '.join(get_args(options[0]))}, repeatable"
    elif get_origin(kind) is list:  # grpo_rewards: each a name, a .py path or a JSON object
        extra = {"action": "append", "type": str, "metavar": name.upper()}
        text = f"{text}; repeatable"
    group.add_argument(*flags, dest=name, default=None, help=text or None, **extra)


def _gpus(text: str) -> list[int] | str:
    """``--gpus 0,1`` or ``--gpus all``."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of GPU indices: give card indices separated by commas, e.g. --gpus 0,1 "
            "(backprop gpu lists the cards), or --gpus all"
        ) from None


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="for scripts: JSON on stdout (jobs: one event per line, then the result) instead of text",
    )


def build_parser() -> argparse.ArgumentParser:
    from engine.contract import spec
    from engine.contract.grpo import GrpoSettings

    parser = argparse.ArgumentParser(
        prog="backprop", description="Fine-tune open LLMs on your own GPU (QLoRA, SLAO, GGUF)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one LoRA/QLoRA fine-tune")
    p.add_argument(
        "--data", required=True, help="JSONL/JSON/CSV/Parquet file, saved datasets folder, or hub name"
    )
    p.add_argument("--output", type=Path, default=None, help="also copy the adapter here")
    _add_settings(p, spec.FinetuneSpec)
    _add_common(p)

    p = sub.add_parser("multi-run", help="a SLAO series: learn new data without forgetting the old")
    p.add_argument(
        "--data", required=True, action="append", help="one dataset split into runs, or repeat per task"
    )
    p.add_argument("--output", type=Path, default=None, help="also copy the merged adapter here")
    _add_settings(p, spec.SeriesSpec)
    _add_common(p)

    p = sub.add_parser("export", help="merge, convert to GGUF, quantize, verify, register with Ollama")
    p.add_argument(
        "source", help="a finished job's id or folder, or a LoRA adapter folder (e.g. ./output/lora)"
    )
    p.add_argument("--format", default="gguf", choices=["gguf"])
    _add_settings(p, spec.ExportSpec, own="export")
    _add_common(p)

    p = sub.add_parser("resume", help="continue a stopped or failed job from its last checkpoint")
    p.add_argument("job", help="the job's id or folder")
    p.add_argument("--workdir", type=Path, default=None, help="where the job folders are")
    _add_json(p)

    p = sub.add_parser("check-data", help="check a dataset: format, bad rows, token lengths, defaults")
    p.add_argument("path")
    _add_setting(p, "model", spec.FinetuneSpec.model_fields["model"])
    _add_setting(p, "method", spec.FinetuneSpec.model_fields["method"])
    _add_setting(
        p, "grpo_rewards", GrpoSettings.model_fields["rewards"]
    )  # method grpo: the answer column checked
    _add_json(p)

    p = sub.add_parser("generate", help="generate from a base model or an adapter")
    p.add_argument("--model", default="tiny")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_json(p)

    p = sub.add_parser("gpu", help="GPUs, memory, temperature, which presets fit")
    _add_json(p)
    p = sub.add_parser("run", help="run a job folder (what the server starts)")
    p.add_argument("job_dir", type=Path)
    sub.add_parser("serve", help="serve the MCP server on stdio (same as backprop-mcp)")
    return parser


class Refused(Exception):
    """A command refused before anything was created; the message says what to do (exit code 2)."""


@contextmanager
def _refusing(*errors: type[BaseException]) -> Iterator[None]:
    """These errors, raised inside, refuse the command with their message."""
    try:
        yield
    except errors as exc:
        raise Refused(str(exc)) from None


def _follow(job_dir: Path, spec: Any, args: argparse.Namespace) -> int:
    """Run the job folder's worker, show its events, end with the summary (or the result as JSON)."""
    from engine.cli.show import for_cli, job_summary
    from engine.jobs.progress import ProgressPrinter
    from engine.jobs.runner import run_and_follow

    if args.json:

        def on_event(e: Any) -> None:
            print(e.model_dump_json(), flush=True)

        result = run_and_follow(job_dir, on_event)
    else:
        with ProgressPrinter(translate=for_cli) as printer:
            result = run_and_follow(job_dir, printer)
    if getattr(args, "output", None) and result.artifacts.get("adapter"):
        import shutil

        shutil.copytree(result.artifacts["adapter"], args.output, dirs_exist_ok=True)
        result.artifacts["adapter_copy"] = str(Path(args.output).resolve())
        print(f"adapter copied to {args.output}", file=sys.stderr)
    if args.json:
        payload = {
            "job_id": job_dir.name,
            "job_dir": str(job_dir),
            **result.model_dump(exclude={"loss_history"}),
        }
        print(json.dumps(payload, default=str))
    else:
        print(job_summary(result, job_dir, spec))
    return 0 if result.status == "succeeded" else 1


def _start(spec: Any, args: argparse.Namespace) -> int:
    from engine.hardware.installed import require_for_spec
    from engine.jobs.runner import create_job
    from engine.planning.preflight import preflight

    require_for_spec(spec, f"backprop {args.command}")  # refuse what would fail before a job folder exists
    for note in preflight(spec, "cli"):
        print(f"note: {note}", file=sys.stderr)
    job_dir = create_job(spec, root=args.workdir)
    print(f"job {job_dir.name}: {job_dir}", file=sys.stderr)
    return _follow(job_dir, spec, args)


def _job_folder(name: str, workdir: Path | None) -> Path:
    """A job folder from its id (under ``workdir`` or the state folder) or its path."""
    from engine.jobs.runner import find_job_dir

    with _refusing(FileNotFoundError):
        return find_job_dir(name, workdir)


def _export_source(source: str, workdir: Path | None) -> str:
    """A job id, a job folder, an adapter folder (adapter_config.json) or a model folder (config.json)."""
    path = Path(source).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("adapter_config.json", "config.json")):
        return str(path.resolve())
    with suppress(Refused):
        return str(_job_folder(source, workdir))
    if path.is_dir():
        raise Refused(
            f"{path} has no adapter_config.json (a LoRA adapter), config.json (a model) or spec.json (a job); "
            "give the folder the adapter was saved in, or a job id"
        )
    raise Refused(
        f"{source!r} is neither a folder nor a job id; `backprop export` takes a job id or a folder"
    )


def _resume(args: argparse.Namespace) -> int:
    from engine.contract.spec import read_spec
    from engine.jobs.resume import resume_point, running_worker
    from engine.jobs.runner import prepare_resume

    job_dir = _job_folder(args.job, args.workdir)
    pid = running_worker(job_dir)
    if pid is not None:
        raise Refused(f"job {job_dir.name} is still running (worker pid {pid}); stop it before resuming")
    where = resume_point(job_dir)
    try:
        previous = prepare_resume(job_dir)
    except ValueError as exc:  # it succeeded: nothing to resume
        raise Refused(f"{exc} (export it with: backprop export {job_dir.name})") from None
    ended = f"it had ended {previous.status}" if previous else "it had stopped without a result"
    print(f"resuming {job_dir.name} ({ended}): {where}", file=sys.stderr)
    return _follow(job_dir, read_spec(job_dir), args)


def _check_data(args: argparse.Namespace) -> int:
    from engine.cli.show import check_data_text
    from engine.contract.settings import training_spec
    from engine.contract.spec import FinetuneSpec
    from engine.hardware.installed import require
    from engine.jobs.commands import check_data

    require("train", "backprop check-data")
    spec = training_spec(
        FinetuneSpec,
        local_or_name(args.path),
        model=args.model,
        method=args.method,
        grpo_rewards=args.grpo_rewards,
    )
    with _refusing(ValueError, OSError):  # DatasetError, ModelError: a missing file, an unknown model
        out = check_data(spec)
    print(out.model_dump_json(indent=2, exclude_none=True) if args.json else check_data_text(out, spec.model))
    return 0 if out.ready else 1


def _gpu(args: argparse.Namespace) -> int:
    from engine.cli.show import gpu_text
    from engine.planning.gpu_report import gpu_report

    report = gpu_report()
    print(report.model_dump_json(indent=2) if args.json else gpu_text(report))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from engine.hardware.installed import require
    from engine.jobs.commands import GenerateArgs, generate

    require("train", "backprop generate")
    request = GenerateArgs(
        model=args.model, adapter=args.adapter, prompt=args.prompt, max_new_tokens=args.max_new_tokens
    )
    with _refusing(ValueError, OSError):  # ModelError: an unknown model, a folder that is no adapter
        out = generate(request)
    print(json.dumps(out, default=str) if args.json else out["text"])
    return 0


def _spec(args: argparse.Namespace) -> Any:
    """The job spec a training or export command describes."""
    from engine.contract import spec as S
    from engine.contract.settings import settings_of, training_spec
    from engine.jobs.runner import init_adapter_path

    def given_for(job: type[BaseModel]) -> dict[str, Any]:
        return {n: getattr(args, n) for n in settings_of(job) if n in vars(args)}

    if args.command in ("train", "multi-run"):
        data = (
            [local_or_name(d) for d in args.data] if isinstance(args.data, list) else local_or_name(args.data)
        )
        if args.command == "train":
            given = given_for(S.FinetuneSpec)
            if given.get("init_adapter"):
                given["init_adapter"] = init_adapter_path(given["init_adapter"], args.workdir)
            return training_spec(S.FinetuneSpec, data, **given)
        return training_spec(S.SeriesSpec, data, **given_for(S.SeriesSpec))
    given = given_for(S.ExportSpec)
    if given["output_dir"]:
        given["output_dir"] = str(Path(given["output_dir"]).expanduser().resolve())
    source = _export_source(args.source, args.workdir)
    return S.ExportSpec(source=source, **{n: v for n, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from engine.jobs.worker import run_job

        return run_job(args.job_dir)
    if args.command == "serve":  # the server takes this process's place (the engine never imports it)
        os.execv(sys.executable, [sys.executable, "-m", "backprop_mcp"])
    from pydantic import ValidationError

    from engine.cli.show import for_cli
    from engine.hardware.installed import MissingExtra
    from engine.planning.preflight import PreflightError, problems

    try:
        if args.command in ("train", "multi-run", "export"):
            return _start(_spec(args), args)
        command = {"resume": _resume, "check-data": _check_data, "gpu": _gpu, "generate": _generate}
        return command[args.command](args)
    except ValidationError as exc:
        listed = "".join(f"\n  {p}" for p in problems(exc))
        print(f"backprop {args.command}: invalid settings:{for_cli(listed)}", file=sys.stderr)
        return 2
    except (Refused, MissingExtra, PreflightError) as exc:
        print(f"backprop {args.command}: {for_cli(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
