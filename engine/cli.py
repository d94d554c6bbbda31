"""The ``backprop`` command line.

Parsing needs nothing but the standard library, so ``backprop --help`` answers at once; each
command imports what it needs when it runs. Training commands run the job in a child process
and draw a live progress bar from its events (Ctrl-C stops the job cleanly, with a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="tiny", help="preset (tiny, qwen2.5-7b, llama3.2-1b, ...), folder or hub name"
    )
    p.add_argument("--quantization", default="auto", choices=["auto", "4bit", "16bit", "none"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2*rank)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: chosen for the model)")
    p.add_argument("--seq-len", type=int, default=None, help="max sequence length (default: from the data)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default: from free memory)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=None, help="pack short examples"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument(
        "--workdir", type=Path, default=None, help="where job folders go (default $BACKPROP_HOME/jobs)"
    )
    p.add_argument("--json", action="store_true", help="print events as JSON lines instead of a progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backprop", description="Fine-tune open LLMs on your own GPU (QLoRA, SLAO, GGUF)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="one LoRA/QLoRA fine-tune")
    _add_model_args(p)
    p.add_argument(
        "--data", required=True, help="JSONL/JSON/CSV/Parquet file, saved datasets folder, or hub name"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--output", type=Path, default=None, help="also copy the adapter here")

    p = sub.add_parser("multi-run", help="a SLAO series: learn new data without forgetting the old")
    _add_model_args(p)
    p.add_argument(
        "--data", required=True, action="append", help="one dataset split into runs, or repeat per task"
    )
    p.add_argument("--num-runs", type=int, default=None)
    p.add_argument("--steps-per-run", type=int, default=None)
    p.add_argument("--samples-per-run", type=int, default=None)
    p.add_argument("--merge-mode", default="slao", choices=["slao", "sequential", "linear", "ties", "dare"])
    p.add_argument("--output", type=Path, default=None, help="also copy the merged adapter here")

    p = sub.add_parser("export", help="merge, convert to GGUF, quantize, verify, register with Ollama")
    p.add_argument("source", help="a finished job's folder or id, or an adapter folder")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument(
        "--quantization",
        action="append",
        default=None,
        help="f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 (repeatable)",
    )
    p.add_argument("--adapter-gguf", action="store_true", help="also write the LoRA adapter as GGUF")
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--ollama", action="store_true", help="register the result with Ollama")
    p.add_argument("--ollama-name", default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("check-data", help="check a dataset: format, bad rows, token lengths, defaults")
    p.add_argument("path")
    p.add_argument("--model", default="tiny")

    p = sub.add_parser("generate", help="generate from a base model or an adapter")
    p.add_argument("--model", default="tiny")
    p.add_argument("--adapter", default=None)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)

    sub.add_parser("gpu", help="GPUs, memory, temperature, which presets fit")
    p = sub.add_parser("run", help="run a job folder (what the server starts)")
    p.add_argument("job_dir", type=Path)
    sub.add_parser("serve", help="serve the MCP server on stdio (same as backprop-mcp)")
    return parser


def _train_settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    values = {
        "learning_rate": args.lr,
        "max_seq_length": args.seq_len,
        "micro_batch_size": args.batch,
        "gradient_accumulation": args.grad_accum,
        "packing": args.packing,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        **extra,
    }
    return {k: v for k, v in values.items() if v is not None}


def _run_job(spec: Any, args: argparse.Namespace) -> int:
    from engine.jobs import create_job, run_and_follow
    from engine.preflight import PreflightError, preflight
    from engine.progress import ProgressPrinter

    try:  # refuse what would fail before any job folder exists
        for note in preflight(spec, "cli"):
            print(f"note: {note}", file=sys.stderr)
    except PreflightError as exc:
        print(f"backprop {args.command}: {exc}", file=sys.stderr)
        return 2
    job_dir = create_job(spec, root=args.workdir)
    print(f"job folder: {job_dir}", file=sys.stderr)
    if args.json:

        def on_event(e: Any) -> None:
            print(e.model_dump_json(), flush=True)

        result = run_and_follow(job_dir, on_event)
    else:
        printer = ProgressPrinter()
        try:
            result = run_and_follow(job_dir, printer)
        finally:
            printer.close()
    if getattr(args, "output", None) and result.artifacts.get("adapter"):
        import shutil

        shutil.copytree(result.artifacts["adapter"], args.output, dirs_exist_ok=True)
        print(f"adapter copied to {args.output}", file=sys.stderr)
    if not args.json:
        print(
            json.dumps(
                {
                    "status": result.status,
                    "metrics": result.metrics,
                    "artifacts": result.artifacts,
                    "error": result.error,
                },
                indent=2,
            )
        )
    return 0 if result.status == "succeeded" else 1


def _resolve_source(source: str) -> str:
    from engine.jobs import jobs_root

    path = Path(source)
    if path.exists():
        return str(path.resolve())
    candidate = jobs_root() / source
    if candidate.exists():
        return str(candidate)
    raise SystemExit(f"backprop export: {source!r} is neither a folder nor a job id under {jobs_root()}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from engine.worker import run_job

        return run_job(args.job_dir)
    if args.command == "serve":
        from backprop_mcp.__main__ import main as serve

        serve()
        return 0
    from pydantic import ValidationError

    from engine import spec as S

    try:
        if args.command == "train":
            data = str(Path(args.data).resolve()) if Path(args.data).exists() else args.data
            spec = S.FinetuneSpec(
                model=args.model,
                quantization=args.quantization,
                device=args.device,
                lora=S.LoraSettings(rank=args.rank, alpha=args.alpha),
                train=S.TrainSettings(**_train_settings(args, steps=args.steps, epochs=args.epochs)),
                dataset=S.DatasetSettings(path=data, skip_bad_rows=args.skip_bad_rows),
            )
            return _run_job(spec, args)
        if args.command == "multi-run":
            spec = S.SeriesSpec(
                model=args.model,
                quantization=args.quantization,
                device=args.device,
                lora=S.LoraSettings(rank=args.rank, alpha=args.alpha),
                train=S.TrainSettings(**_train_settings(args)),
                datasets=[
                    S.DatasetSettings(path=str(Path(d).resolve()) if Path(d).exists() else d)
                    for d in args.data
                ],
                num_runs=args.num_runs,
                steps_per_run=args.steps_per_run,
                samples_per_run=args.samples_per_run,
                merge_mode=args.merge_mode,
            )
            return _run_job(spec, args)
        if args.command == "export":
            spec = S.ExportSpec(
                source=_resolve_source(args.source),
                quantizations=args.quantization or ["q4_k_m"],
                adapter_gguf=args.adapter_gguf,
                verify=not args.no_verify,
                register_ollama=args.ollama,
                ollama_name=args.ollama_name,
            )
            return _run_job(spec, args)
    except ValidationError as exc:
        print(f"backprop {args.command}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.command == "check-data":
        from engine.oneshot import CheckDataArgs, check_data

        print(json.dumps(check_data(CheckDataArgs(path=args.path, model=args.model)), indent=2, default=str))
        return 0
    if args.command == "generate":
        from engine.oneshot import GenerateArgs, generate

        out = generate(
            GenerateArgs(
                model=args.model, adapter=args.adapter, prompt=args.prompt, max_new_tokens=args.max_new_tokens
            )
        )
        print(out["text"])
        return 0
    if args.command == "gpu":
        from engine.hardware import probe_gpus

        probe = probe_gpus()
        print(
            json.dumps(
                probe.to_dict() if hasattr(probe, "to_dict") else probe.__dict__, indent=2, default=str
            )
        )
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
