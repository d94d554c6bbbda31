"""What ``inspect_gpu``, ``backprop://gpu`` and ``backprop gpu`` report (torch-free: NVML and psutil).

The probe.gpus as NVML sees them, the machine's CPU and memory, and which presets fit (``preset_fits``).
The models are the tool's output schema too, so the server and the CLI print one report.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from engine.hardware.gpus import GpuInfo
from engine.models.presets import PRESETS
from engine.planning.memory import card_keywords, estimate_memory, fits, largest_micro_batch


class PresetFit(BaseModel):
    preset: str
    model: str
    fits: bool
    micro_batch_size: int | None = Field(
        None,
        description="the largest micro-batch (up to 16) that fits, on the card with the most free memory",
    )
    estimated_memory_gib: float | None = Field(None, description="GPU memory needed at micro-batch 1")
    cards: list[int] = Field(
        default_factory=list, description="the cards that hold it whole (a DDP job may use any of them)"
    )
    fsdp_memory_per_card_gib: float | None = Field(
        None,
        description="when no card holds it whole: memory per card with its weights sharded over all (FSDP)",
    )
    note: str | None = None


class GpuReport(BaseModel):
    available: bool
    gpus: list[GpuInfo]
    reason: str | None = Field(None, description="why no GPU is usable, when none is")
    notes: list[str] = Field(default_factory=list)
    cpu_cores: int | None = None
    ram_total_gib: float | None = None
    ram_available_gib: float | None = None
    presets: list[PresetFit] = Field(
        default_factory=list, description="which model presets fit, on which cards, or on the CPU"
    )
    summary: str


def gpu_report() -> GpuReport:
    import psutil  # in a function: the server imports this module (cold start, see jobs/processes)

    from engine.hardware.gpus import probe_gpus  # looked up at call time (tests replace it)

    probe = probe_gpus()
    mem = psutil.virtual_memory()
    if probe.available and probe.gpus:
        summary = ", ".join(c.free_text() for c in probe.gpus)
    else:
        summary = (
            f"No usable NVIDIA GPU ({probe.reason}). Fine-tuning still works on the CPU for small models "
            "(the 'tiny' preset, models up to ~0.5B parameters with few steps); larger models need a GPU."
        )
    return GpuReport(
        available=probe.available,
        gpus=probe.gpus,
        reason=probe.reason,
        notes=list(probe.notes),
        cpu_cores=psutil.cpu_count(logical=True),
        ram_total_gib=round(mem.total / 1024**3, 1),
        ram_available_gib=round(mem.available / 1024**3, 1),
        presets=preset_fits(probe),
        summary=summary,
    )


def preset_fits(probe: Any, seq_length: int = 2048, rank: int = 16) -> list[PresetFit]:
    """Which presets train (QLoRA 4-bit), on which cards and with what micro-batch, or on the CPU.

    With several cards, a preset that no card holds whole is tried with its weights sharded over all
    of them (FSDP), each card holding its share.
    """
    cards = list(probe.gpus) if probe.available else []
    out = []
    for preset in PRESETS.values():
        model = preset.hf_id or "built offline"
        if not cards:
            small = preset.hf_id is None or preset.params_b <= 0.6
            note = ("trains on the CPU" + (" (slowly)" if preset.hf_id else "")) if small else "needs a GPU"
            out.append(PresetFit(preset=preset.name, model=model, fits=small, note=note))
            continue
        seq = min(seq_length, preset.shape.max_context)

        micro = {
            c.index: largest_micro_batch(
                preset.shape, "4bit", rank, seq, c.memory_free_mb / 1024, limit=16, **card_keywords(c)
            )
            for c in cards
        }
        best = max(cards, key=lambda c: c.memory_free_mb)
        need = estimate_memory(preset.shape, "4bit", rank, 1, seq, **card_keywords(best)).total_gib
        whole = [i for i, m in micro.items() if m > 0]
        sharded = None
        if not whole and len(cards) > 1:
            per_card = [
                estimate_memory(preset.shape, "4bit", rank, 1, seq, **card_keywords(c, len(cards)))
                for c in cards
            ]
            if all(fits(e, c.memory_free_mb / 1024, False) for e, c in zip(per_card, cards, strict=True)):
                sharded = round(max(e.total_gib for e in per_card), 2)
        note = f"QLoRA 4-bit, rank {rank}, {seq}-token sequences" + (
            ", gated: accept the licence on the hub first" if preset.gated else ""
        )
        out.append(
            PresetFit(
                preset=preset.name,
                model=model,
                fits=bool(whole) or sharded is not None,
                micro_batch_size=micro[best.index] or None,
                estimated_memory_gib=round(need, 2),
                cards=whole,
                fsdp_memory_per_card_gib=sharded,
                note=note,
            )
        )
    return out
