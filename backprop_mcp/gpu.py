"""What ``inspect_gpu`` and ``backprop://gpu`` report: the cards (NVML, no torch) and which presets fit."""

from __future__ import annotations

from typing import Any

from backprop_mcp.models import GpuCard, GpuReport, PresetFit


def gpu_report() -> GpuReport:
    import psutil

    from engine.hardware import probe_gpus

    probe = probe_gpus()
    mem = psutil.virtual_memory()
    cards = [
        GpuCard.model_validate({k: v for k, v in g.to_dict().items() if k in GpuCard.model_fields})
        for g in probe.gpus
    ]
    if probe.available and cards:
        summary = ", ".join(
            f"GPU {c.index}: {c.name}, {c.memory_free_mb / 1024:.1f} of {c.memory_total_mb / 1024:.1f} GiB free"
            for c in cards
        )
    else:
        summary = (
            f"No usable NVIDIA GPU ({probe.reason}). Fine-tuning still works on the CPU for small models "
            "(the 'tiny' preset, models up to ~0.5B parameters with few steps); larger models need a GPU."
        )
    return GpuReport(
        available=probe.available,
        gpus=cards,
        reason=probe.reason,
        notes=list(probe.notes),
        cpu_cores=psutil.cpu_count(logical=True),
        ram_total_gib=round(mem.total / 1024**3, 1),
        ram_available_gib=round(mem.available / 1024**3, 1),
        presets=preset_fits(probe),
        summary=summary,
    )


def preset_fits(probe: Any) -> list[PresetFit]:
    from engine.memory import estimate_memory, largest_micro_batch
    from engine.models import PRESETS

    fits = []
    card = probe.gpus[0] if probe.available and probe.gpus else None
    for preset in PRESETS.values():
        seq = min(2048, preset.shape.max_context)
        if card is None:
            small = preset.hf_id is None or preset.params_b <= 0.6
            fits.append(
                PresetFit(
                    preset=preset.name,
                    model=preset.hf_id or "built offline",
                    fits=small,
                    micro_batch_size=None,
                    estimated_memory_gib=None,
                    note="trains on the CPU" + (" (slowly)" if preset.hf_id else "")
                    if small
                    else "needs a GPU",
                )
            )
            continue
        kwargs: dict[str, Any] = {"device": "cuda", "bf16_supported": card.bf16_supported}
        free = card.memory_free_mb / 1024
        micro = largest_micro_batch(preset.shape, "4bit", 16, seq, free, limit=16, **kwargs)
        need = estimate_memory(preset.shape, "4bit", 16, 1, seq, **kwargs).total_gib
        fits.append(
            PresetFit(
                preset=preset.name,
                model=preset.hf_id or "built offline",
                fits=micro > 0,
                micro_batch_size=micro or None,
                estimated_memory_gib=round(need, 2),
                note=f"QLoRA 4-bit, rank 16, {seq}-token sequences"
                + (", gated: accept the licence on the hub first" if preset.gated else ""),
            )
        )
    return fits
