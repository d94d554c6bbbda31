"""One-shot commands that need the ML stack: dataset check with token statistics, and generation.

Each takes a JSON object of arguments and prints one JSON object. The server runs them as
subprocesses (``python -m engine check-data|generate -``, the JSON on stdin) so that it never imports torch;
the CLI and the Python API call the same functions in-process.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.planning.preflight import DataCheck, TokenStats


class CheckDataArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    model: str = "tiny"
    split: str | None = None
    skip_bad_rows: bool = False
    quantization: str = "auto"
    lora_rank: int = Field(16, ge=1)
    max_seq_length: int | None = Field(None, ge=16)
    micro_batch_size: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1)
    device: str = "auto"
    trust_remote_code: bool = False
    method: Literal["sft", "dpo", "kto", "orpo"] | None = Field(
        None, description="the defaults' method; default: dpo for pairs, kto for judged answers, else sft"
    )
    max_prompt_length: int | None = Field(None, ge=1)


class GenerateArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="base model (preset, folder or hub name)")
    adapter: str | None = Field(None, description="a PEFT adapter folder to apply")
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    max_new_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    max_time_s: float = Field(60.0, gt=0, le=600)
    device: str = "auto"
    trust_remote_code: bool = False


def check_data(args: CheckDataArgs) -> DataCheck:
    from engine.contract.spec import DatasetSettings
    from engine.data.formats import load_examples
    from engine.data.methods import examples_for_method, format_problem
    from engine.data.preference import PREFERENCE_FORMATS
    from engine.models.presets import model_shape
    from engine.training.base_model import load_tokenizer
    from engine.training.loading import pick_device

    settings = DatasetSettings(path=args.path, split=args.split, skip_bad_rows=True)
    examples, report = load_examples(settings)
    out = DataCheck(report=report.to_dict())
    if not examples:
        return out
    paired = report.format in ("preference", "preference_implicit")
    out.method = args.method or ("dpo" if paired else "kto" if report.format in PREFERENCE_FORMATS else "sft")
    out.method_problem = format_problem(out.method, report.format)
    if out.method_problem:
        return out
    examples, out.method_note = examples_for_method(examples, out.method)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    device = pick_device(args.device)
    free_gib = None
    if device.startswith("cuda"):
        from engine.hardware.gpus import probe_gpus

        probe = probe_gpus()
        if probe.gpus:
            free_gib = probe.gpus[0].memory_free_mb / 1024
    shape = model_shape(args.model, trust_remote_code=args.trust_remote_code)
    fit = {
        "shape": shape, "quantization": args.quantization, "lora_rank": args.lora_rank, "device": device,
        "free_memory_gib": free_gib,
    }  # fmt: skip
    extra: dict[str, Any] = {}  # decided beside the fine-tune's settings (a preference job's prompt length)
    try:
        if out.method == "sft":
            resolved = _supervised_defaults(out, args, examples, tokenizer, fit)
        else:
            resolved = _preference_defaults(out, args, examples, tokenizer, fit, extra)
    except ValueError as exc:  # DoesNotFitError is a ValueError
        out.fits, out.fit_error = False, str(exc)
        return out
    out.fits = True
    out.defaults = {k: extra[k] if k in extra else getattr(resolved, k) for k in resolved.reasons}
    out.reasons = resolved.reasons
    out.memory_estimate_gib = _estimate(resolved, args, shape, device, out.method).to_dict()
    out.device = device
    return out


def _stats(lengths: list[int]) -> TokenStats:
    from engine.planning.defaults import percentile

    return TokenStats(
        examples=len(lengths),
        total=sum(lengths),
        min=min(lengths),
        median=round(percentile(lengths, 50)),
        p95=round(percentile(lengths, 95)),
        max=max(lengths),
    )


def _train_settings(args: CheckDataArgs, max_seq_length: int | None) -> Any:
    from engine.contract.spec import TrainSettings

    return TrainSettings(
        max_seq_length=max_seq_length, micro_batch_size=args.micro_batch_size, steps=args.steps
    )


def _supervised_defaults(
    out: DataCheck, args: CheckDataArgs, examples: list[Any], tokenizer: Any, fit: dict[str, Any]
) -> Any:
    from engine.data.tokenizing import tokenize_all
    from engine.planning.defaults import resolve_training

    lengths = tokenize_all(examples, tokenizer, None).lengths
    out.tokens = _stats(lengths)
    return resolve_training(
        _train_settings(args, args.max_seq_length), n_examples=len(lengths), token_lengths=lengths, **fit
    )


def _preference_defaults(
    out: DataCheck,
    args: CheckDataArgs,
    examples: list[Any],
    tokenizer: Any,
    fit: dict[str, Any],
    extra: dict[str, Any],
) -> Any:
    """Token statistics of prompts, answers and sequences; the two lengths and the defaults they give."""
    from engine.data.preference_tokens import tokenize_preferences, truncated
    from engine.planning.preference import resolve_preference, sequence_lengths

    whole = tokenize_preferences(examples, tokenizer)
    out.tokens = _stats(whole.sequence_lengths())
    out.prompt_tokens = _stats(whole.prompt_token_lengths())
    out.completion_tokens = _stats(whole.completion_lengths())
    seq, prompt, reasons = sequence_lengths(
        whole.prompt_token_lengths(), whole.sequence_lengths(), whole.completion_lengths(),
        max_seq_length=args.max_seq_length, max_prompt_length=args.max_prompt_length,
        max_context=fit["shape"].max_context,
    )  # fmt: skip
    data = truncated(whole, prompt, seq)
    resolved = resolve_preference(
        _train_settings(args, None), out.method or "dpo", units=len(data.units), max_seq_length=seq,
        truncated_sequences=data.truncated, **fit,
    )  # fmt: skip
    resolved.reasons.update(reasons)
    extra["max_prompt_length"] = prompt
    return resolved


def _estimate(resolved: Any, args: CheckDataArgs, shape: Any, device: str, method: str | None) -> Any:
    """The defaults' own estimate where they had a memory figure (it has their recompute/offload choice)."""
    from engine.planning.memory import estimate_memory
    from engine.planning.preference import PAIRED

    if resolved.memory is not None:
        return resolved.memory
    return estimate_memory(
        shape,
        quantization=args.quantization,
        lora_rank=args.lora_rank,
        micro_batch=resolved.micro_batch_size * (2 if method in PAIRED else 1),
        seq_len=resolved.max_seq_length,
        device="cuda" if device.startswith("cuda") else "cpu",
        gradient_checkpointing=resolved.gradient_checkpointing,
        offload_activations=resolved.offload_activations,
    )


def generate(args: GenerateArgs) -> dict[str, Any]:
    import torch

    from engine.data.tokenizing import render_prompt
    from engine.training.loading import pick_device

    if not args.prompt and not args.messages:
        raise ValueError("give a prompt or a list of messages")
    device = pick_device(args.device)
    from engine.training.base_model import load_for_inference

    model, tokenizer = load_for_inference(
        args.model, adapter=args.adapter, device=device, trust_remote_code=args.trust_remote_code
    )
    messages = list(args.messages or [])
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    if args.prompt:
        messages.append({"role": "user", "content": args.prompt})
    if tokenizer.chat_template:
        text = render_prompt(messages, tokenizer)
    else:  # a base model without a chat template: plain continuation
        text = "\n".join(m["content"] for m in messages)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_p=None,
            top_k=None,
            max_time=args.max_time_s,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :]
    seconds = time.perf_counter() - t0
    return {
        "ok": True,
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": round(seconds, 3),
        "stopped_by_time": seconds >= args.max_time_s,
        "prompt": text,
    }


def run_oneshot(command: str, raw_args: str) -> int:
    from engine.models.presets import privacy_environment

    privacy_environment()
    try:
        data = json.loads(sys.stdin.read() if raw_args == "-" else raw_args)  # "-": the JSON on stdin
        if command == "check-data":
            result = {
                "ok": True,
                **check_data(CheckDataArgs.model_validate(data)).model_dump(exclude_none=True),
            }
        else:
            result = generate(GenerateArgs.model_validate(data))
        print(json.dumps(result, default=str))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported as JSON for the caller
        print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}))
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
