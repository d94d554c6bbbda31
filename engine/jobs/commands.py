"""One-shot commands that need the ML stack: dataset check with token statistics, and generation.

Each takes a JSON object of arguments and prints one JSON object. The server runs them as
subprocesses (``python -m engine check-data|generate -``, the JSON on stdin) so that it never imports torch;
the CLI and the Python API call the same functions in-process.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.contract.settings import training_spec
from engine.contract.spec import FinetuneSpec
from engine.planning.preflight import DataCheck, TokenStats


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


def check_data(spec: FinetuneSpec) -> DataCheck:
    """What a fine-tune of ``spec`` meets: its dataset's rows (every bad one reported), what its method makes
    of them, their token lengths with its model's tokenizer, and the defaults it would resolve on this machine
    (or why it cannot fit)."""
    from engine.data.formats import load_examples
    from engine.data.methods import examples_for_method, format_problem
    from engine.training.loading import pick_device

    examples, report = load_examples(spec.dataset.model_copy(update={"skip_bad_rows": True}))
    out = DataCheck(report=report.to_dict(), method=spec.method)
    if not examples:
        return out
    out.method_problem = format_problem(spec.method, report.format)
    if out.method_problem:
        return out
    examples, out.method_note = examples_for_method(examples, spec.method)
    from engine.models.presets import model_shape
    from engine.training.base_model import load_tokenizer

    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    device = pick_device(spec.device, spec.gpu_index)
    free_gib = None
    if device.startswith("cuda"):
        from engine.hardware.gpus import probe_gpus

        card = next((g for g in probe_gpus().gpus if g.index == spec.gpu_index), None)
        free_gib = card.memory_free_mb / 1024 if card else None
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code)
    fit = {
        "shape": shape, "quantization": spec.quantization, "lora_rank": spec.lora.rank, "device": device,
        "free_memory_gib": free_gib, "lora_targets": spec.lora.target_modules,
    }  # fmt: skip
    extra: dict[str, Any] = {}  # decided beside the training settings (a preference job's prompt length)
    try:
        if spec.method == "sft":
            resolved = _supervised_defaults(out, spec, examples, tokenizer, fit)
        elif spec.method == "grpo":
            resolved = _grpo_defaults(out, spec, examples, tokenizer, fit, extra)
        else:
            resolved = _preference_defaults(out, spec, examples, tokenizer, fit, extra)
    except ValueError as exc:  # DoesNotFitError is a ValueError
        out.fits, out.fit_error = False, str(exc)
        return out
    out.fits = True
    out.defaults = {k: extra[k] if k in extra else getattr(resolved, k) for k in resolved.reasons}
    out.reasons = resolved.reasons
    out.memory_estimate_gib = extra.pop("memory", None) or _estimate(resolved, spec, shape, device).to_dict()
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


def _supervised_defaults(
    out: DataCheck, spec: FinetuneSpec, examples: list[Any], tokenizer: Any, fit: dict[str, Any]
) -> Any:
    from engine.data.tokenizing import tokenize_all
    from engine.planning.defaults import resolve_training

    lengths = tokenize_all(examples, tokenizer, None).lengths
    out.tokens = _stats(lengths)
    return resolve_training(spec.train, n_examples=len(lengths), token_lengths=lengths, **fit)


def _preference_defaults(
    out: DataCheck,
    spec: FinetuneSpec,
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
        max_seq_length=spec.train.max_seq_length, max_prompt_length=spec.preference.max_prompt_length,
        max_context=fit["shape"].max_context,
    )  # fmt: skip
    data = truncated(whole, prompt, seq)
    resolved = resolve_preference(
        spec.train, spec.method, units=len(data.units), max_seq_length=seq, truncated_sequences=data.truncated,
        **fit,
    )  # fmt: skip
    resolved.reasons.update(reasons)
    extra["max_prompt_length"] = prompt
    return resolved


def _grpo_defaults(
    out: DataCheck,
    spec: FinetuneSpec,
    examples: list[Any],
    tokenizer: Any,
    fit: dict[str, Any],
    extra: dict[str, Any],
) -> Any:
    """The prompts' token statistics and the GRPO plan (completions per prompt, their length, the batches)."""
    from engine.planning.grpo_preflight import GrpoProblem, check_grpo, grpo_defaults

    try:
        check_grpo(spec)  # the rewards' files and the columns they read
    except GrpoProblem as exc:
        out.method_problem = str(exc)
    resolved, decided, lengths, memory = grpo_defaults(spec, examples, tokenizer, fit)
    out.tokens = out.prompt_tokens = _stats(lengths)
    extra.update(decided)
    if memory is not None:  # both phases: sampling (KV cache) and learning
        extra["memory"] = {
            **memory.train.to_dict(),
            "total_gib": memory.total_gib,
            "sampling_gib": memory.generating_total_gib,
        }
    return resolved


def _estimate(resolved: Any, spec: FinetuneSpec, shape: Any, device: str) -> Any:
    """The defaults' own estimate where they had a memory figure (it has their recompute/offload choice)."""
    from engine.planning.memory import estimate_memory
    from engine.planning.preference import rows_per_unit

    if resolved.memory is not None:
        return resolved.memory
    return estimate_memory(
        shape,
        quantization=spec.quantization,
        lora_rank=spec.lora.rank,
        micro_batch=resolved.micro_batch_size * rows_per_unit(spec.method),
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
        if command == "check-data":  # {"path": ..., any fine-tune setting: value}
            spec = training_spec(FinetuneSpec, data.pop("path"), **data)
            result = {"ok": True, **check_data(spec).model_dump(exclude_none=True)}
        else:
            result = generate(GenerateArgs.model_validate(data))
        print(json.dumps(result, default=str))
        return 0
    except Exception as exc:  # noqa: BLE001 - reported as JSON for the caller
        print(json.dumps({"ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}))
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
