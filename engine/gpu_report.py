"""What ``inspect_gpu``, ``backprop://gpu`` and ``backprop gpu`` report (torch-free: NVML and psutil).

The probe.gpus as NVML sees them, the machine's CPU and memory, and which presets fit (``preflight``).
The models are the tool's output schema too, so the server and the CLI print one report.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from engine.hardware import GpuInfo


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
    import psutil

    from engine.hardware import probe_gpus  # looked up at call time (tests replace it)
    from engine.preflight import preset_fits

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
