"""What ``inspect_gpu`` and ``backprop://gpu`` report: the cards (NVML, no torch) and which presets fit."""

from __future__ import annotations

from dataclasses import asdict

from backprop_mcp.models import GpuCard, GpuReport, PresetFit
from engine.interface import preset_fits, probe_gpus


def gpu_report() -> GpuReport:
    import psutil

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
        presets=[PresetFit.model_validate(asdict(fit)) for fit in preset_fits(probe)],
        summary=summary,
    )
