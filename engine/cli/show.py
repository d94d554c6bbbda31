"""What the ``backprop`` command line prints for people: tables, one-line summaries, next commands.

Scripts pass ``--json`` and get the underlying objects instead; nothing here is parsed back. The
engine's messages name the API's settings (``skip_bad_rows``, ``max_seq_length``); ``for_cli``
rewrites those names into the flags a command-line user types, so each message is written once.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.contract.settings import settings_of
from engine.contract.spec import ExportSpec, FinetuneSpec, SeriesSpec

if TYPE_CHECKING:
    from engine.planning.preflight import DataCheck

# The settings' names, as messages write them; each is also a flag of the commands (engine/cli/main.py), spelled
# by engine.planning.preflight.spell the same way the preflight spells ``--skip-bad-rows``.
SETTINGS = sorted({*settings_of(FinetuneSpec), *settings_of(SeriesSpec), *settings_of(ExportSpec)})
_SETTING_RE = re.compile(r"\b(" + "|".join(SETTINGS) + r")\b(?:\s*=\s*'?(\[[\d, ]*\]|[\w.]+)'?|\s+'(\w+)')?")


def for_cli(message: str) -> str:
    """``message`` with API setting names as command-line flags (``skip_bad_rows=true`` -> ``--skip-bad-rows``)."""
    from engine.planning.preflight import spell

    def flag(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2) or m.group(3)
        english = value is None and "_" not in name  # "a smaller model", not the setting
        if english or value == "[]":
            return m.group(0)
        if value in ("false", "False"):
            return "--no-" + name.replace("_", "-")
        return spell(name, True if value in (None, "true", "True") else value, "cli")

    return _SETTING_RE.sub(flag, message)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns, two spaces apart (plain text: it pipes and copies cleanly)."""
    cells = [headers] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _num(value: Any, fmt: str = ".4g") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "?"


# -- backprop gpu ------------------------------------------------------------------------------


def gpu_text(report: Any) -> str:
    """``backprop gpu``: each card, then which presets fit and with what micro-batch."""
    lines: list[str] = []
    if report.available and report.gpus:
        for c in report.gpus:
            extras = [
                f"{c.temperature_c} °C" if c.temperature_c is not None else None,
                f"{c.utilization_pct}% busy" if c.utilization_pct is not None else None,
                f"compute {c.compute_capability}" if c.compute_capability else None,
                "bf16" if c.bf16_supported else "no bf16 (fp16 autocast)",
                f"driver {c.driver_version}" if c.driver_version else None,
                f"CUDA {c.cuda_driver_version}" if c.cuda_driver_version else None,
            ]
            lines.append(c.free_text() + "".join(f", {e}" for e in extras if e))
        lines.append("")
        several = len(report.gpus) > 1
        where = f"GPU{'s' if several else ''} {', '.join(str(c.index) for c in report.gpus)}"
        lines.append(f"Presets on {where} (QLoRA 4-bit, LoRA rank 16, 2048-token sequences):")

        def on(p: Any) -> str:
            if p.fsdp_memory_per_card_gib is not None:
                return f"all, FSDP ({p.fsdp_memory_per_card_gib:.1f} GiB each)"
            return ",".join(str(i) for i in p.cards) or "-"

        rows = [
            [
                p.preset,
                p.model,
                "yes" if p.fits else "no",
                p.micro_batch_size or "-",
                f"{p.estimated_memory_gib:.1f} GiB" if p.estimated_memory_gib is not None else "-",
                *([on(p)] if several else []),
                "gated on the hub" if "gated" in (p.note or "") else "",
            ]
            for p in report.presets
        ]
        cards = ["cards"] if several else []
        head = ["preset", "model", "fits", "micro-batch", "memory at batch 1", *cards, "note"]
        lines.append(table(head, rows))
    else:
        lines.append(f"No usable NVIDIA GPU: {report.reason or 'none found'}.")
        lines.append(
            "Training still works on the CPU for small models (the 'tiny' preset, up to ~0.5B parameters "
            "with few steps); larger models need a GPU."
        )
        lines.append("")
        rows = [
            [
                p.preset,
                p.model,
                "CPU" if p.fits else "needs a GPU",
                "slowly" if "slowly" in (p.note or "") else "",
            ]
            for p in report.presets
        ]
        lines.append(table(["preset", "model", "trains on", "note"], rows))
    for note in report.notes:
        lines.append(f"note: {note}")
    if report.cpu_cores is not None:
        lines.append(
            f"CPU: {report.cpu_cores} cores, RAM {report.ram_available_gib} of {report.ram_total_gib} GiB available"
        )
    return "\n".join(lines)


# -- backprop check-data -----------------------------------------------------------------------


def with_article(method: str) -> str:
    """The method with its article, "an" before a vowel sound: a dpo, a kto, a grpo, an orpo, an sft (the
    names are read letter by letter, "ess-eff-tee", or as a word starting with a vowel, "orpo")."""
    said_with_a_vowel = "aeio" + "fhlmnrsx"  # vowels; letters whose names start with one ("eff", "ess")
    return f"{'an' if method[:1].lower() in said_with_a_vowel else 'a'} {method}"


def check_data_text(out: DataCheck, model: str) -> str:
    """``backprop check-data``: the report, ending with whether the dataset is ready to train on."""
    r = out.report
    lines = [
        f"{r.get('path')}: {r.get('format')} format, {r.get('rows_ok')} of {r.get('rows_total')} rows usable"
    ]
    bad = int(r.get("bad_rows") or 0)
    if bad:
        lines.append(f"{bad} bad row(s):")
        lines += [f"  {p}" for p in r.get("problems", [])]
        if bad > len(r.get("problems", [])):
            lines.append(f"  ... and {bad - len(r.get('problems', []))} more")
        lines.append(
            f"Fix them, or add --skip-bad-rows to train on the {r.get('rows_ok')} good rows (the skipped rows are reported)."
        )
    for note in (out.method_problem, out.method_note):
        if note:
            lines.append(note)
    counted = (  # a preference file: each sequence (a prompt and one answer), its prompts and its answers
        [("tokens", "sequences", "sequence", out.tokens), ("prompt tokens", "prompts", "prompt", out.prompt_tokens),
         ("answer tokens", "answers", "answer", out.completion_tokens)]
        if out.prompt_tokens else [("tokens", "examples", "example", out.tokens)]
    )  # fmt: skip
    for what, many, one, t in counted:
        if t is not None:
            lines.append(
                f"{what} ({model}'s tokenizer and chat template): {t.examples} {many}, {t.total} in all; "
                f"per {one} min {t.min}, median {t.median}, p95 {t.p95}, max {t.max}"
            )
    if out.fits is False:
        lines.append(f"does not fit: {for_cli(str(out.fit_error))}")
    elif d := out.defaults:
        mem = (out.memory_estimate_gib or {}).get("total_gib")
        prompt = d.get("max_prompt_length")
        lines.append(
            f"{with_article(out.method or 'sft')} fine-tune would use: {d.get('steps')} steps, micro-batch "
            f"{d.get('micro_batch_size')} x {d.get('gradient_accumulation')}, sequences of {d.get('max_seq_length')} "
            "tokens"
            + (f" (prompts up to {prompt})" if prompt else "")
            + (", packed" if d.get("packing") else "")
            + f", learning rate {d.get('learning_rate')}"
            + (f", about {mem:.1f} GiB" if isinstance(mem, (int, float)) else "")
            + f" on {out.device}"
        )
    lines.append("ready to train" if out.ready else "not ready: fix the problems above first")
    return "\n".join(lines)


# -- the end of a job --------------------------------------------------------------------------


def _q(text: str | Path) -> str:
    return shlex.quote(str(text))


def job_summary(result: Any, job_dir: Path, spec: Any) -> str:
    """The few lines a person reads when a job ends: outcome, where things are, what to run next."""
    job_id = job_dir.name
    m, a = result.metrics, result.artifacts
    if result.status == "cancelled":  # the progress printer has shown the resume command
        err = result.error or {}
        text = f"stopped: {err.get('message', 'cancelled')} (job {job_id}, {job_dir})"
        return text + (f"\nresume it with: {err['hint']}" if err.get("hint") else "")
    if result.status != "succeeded":
        err = result.error or {}
        text = f"failed: {err.get('type', 'Error')}: {for_cli(str(err.get('message', '')))}"
        if err.get("hint"):
            text += f"\n  {for_cli(str(err['hint']))}"
        return text + f"\njob folder: {job_dir} (worker.log has the details)"
    if result.kind == "export":
        return _export_summary(m, a, job_dir)
    lines = []
    if result.kind == "slao_series":
        # accuracy where every slice has reference answers, held-out loss always
        key = "" if m.get("average_accuracy") is not None else "loss_"
        what = "accuracy" if not key else "held-out loss"
        lines.append(
            f"done: {m.get('runs', '?')} {m.get('merge_mode', '')} runs in {seconds(m.get('wall_seconds'))}; "
            f"average {what} {_num(m.get(key + ('average_accuracy' if not key else 'average')), '.3f')}, "
            f"backward transfer {_num(m.get(key + 'backward_transfer'), '.3f')}, "
            f"forgetting {_num(m.get(key + 'forgetting'), '.3f')}"
        )
    else:
        lines.append(
            f"done: {m.get('steps')} steps in {seconds(m.get('train_seconds'))} "
            f"({_num(m.get('tokens_per_s'), '.0f')} tokens/s on {m.get('device')}), "
            f"loss {_num(m.get('first_loss'))} -> {_num(m.get('final_loss'))}"
            + (f", held-out loss {_num(m['eval_loss'])}" if isinstance(m.get("eval_loss"), float) else "")
        )
    adapter = a.get("adapter")
    if adapter:
        lines.append(f"adapter: {adapter}")
    lines.append(f"job: {job_id} ({job_dir})")
    model = getattr(spec, "model", "tiny")
    if adapter:
        lines.append("next:")
        lines.append(f"  backprop generate --model {_q(model)} --adapter {_q(adapter)} --prompt 'Hello!'")
        lines.append(f"  backprop export {job_id} --quantization q4_k_m --output-dir ./gguf")
    return "\n".join(lines)


def _export_summary(m: dict[str, Any], a: dict[str, str], job_dir: Path) -> str:
    lines = ["done: exported to GGUF"]
    for name, path in a.items():
        if name.startswith("gguf_") or name == "adapter_gguf":
            quant = name.removeprefix("gguf_")
            size = (m.get("files", {}).get(quant) or m.get("files", {}).get("adapter") or {}).get("human", "")
            verdict = (m.get("parity", {}).get(quant) or {}).get("passed")
            check = {True: ", verified", False: ", verification failed", None: ""}[verdict]
            lines.append(f"  {path}  ({size}{check})")
    if a.get("modelfile"):
        lines.append(f"  {a['modelfile']}")
    if m.get("ollama_registered_via"):
        lines.append(f"registered with Ollama: {m.get('ollama_run')}")
    elif m.get("ollama_create"):
        lines.append(f"next: {m['ollama_create']} && ollama run {m.get('ollama_model')}")
    lines.append(f"job: {job_dir.name} ({job_dir})")
    return "\n".join(lines)
