"""GPU probing, monitoring and the thermal guard.

The no-GPU path runs for real (this machine has no NVIDIA driver). GPU readings cannot exist
here, so those tests replace the NVML module with a small fake that answers like pynvml does.
"""

from __future__ import annotations

import ctypes.util
import types

import pynvml
import pytest

from engine.contract.spec import SafetySettings
from engine.hardware import gpus as hardware
from engine.hardware.gpus import GpuMonitor, ThermalGuard, probe_gpus

NO_NVML = ctypes.util.find_library("nvidia-ml") is None


def test_probe_says_plainly_when_there_is_no_gpu():
    probe = probe_gpus()
    if NO_NVML:
        assert probe.available is False
        assert probe.gpus == []
        assert probe.reason is not None and "no NVIDIA driver" in probe.reason
        assert probe.to_dict()["available"] is False
    else:  # on a GPU machine the same call describes the cards
        assert probe.available and probe.gpus


@pytest.mark.skipif(not NO_NVML, reason="needs a machine without the NVIDIA driver")
def test_monitor_without_gpu_returns_none():
    with GpuMonitor(0) as mon:
        assert mon.available is False
        assert mon.sample() is None
        assert mon.unavailable_reason and "NVML" in mon.unavailable_reason


class _FakeNvml(types.SimpleNamespace):
    """Stands in for pynvml: two cards (an A100-like cc 8.0, a T4-like cc 7.5). Mocked: no GPU here."""

    def __init__(self, temps: list[int] | None = None) -> None:
        super().__init__()
        self.NVMLError = pynvml.NVMLError
        self.NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
        self.NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
        self.NVMLError_NoPermission = pynvml.NVMLError_NoPermission
        self.NVML_TEMPERATURE_GPU = 0
        self.temps = list(temps or [])
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i not in (0, 1):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes | str:
        return b"NVIDIA A100-SXM4-80GB" if h == 0 else "Tesla T4"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        total = (80 if h == 0 else 16) * 1024**3
        used = 1024**3
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(gpu=37, memory=10)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self.temps.pop(0) if self.temps else 55

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if h == 1:  # some cards do not report power
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return 312_500  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return 400_000

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return (8, 0) if h == 0 else (7, 5)

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h}"


def test_probe_reads_every_field(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe = probe_gpus()
    assert probe.available and probe.reason is None
    a100, t4 = probe.gpus
    assert a100.name == "NVIDIA A100-SXM4-80GB" and t4.name == "Tesla T4"
    assert a100.memory_total_mb == 80 * 1024 and a100.memory_used_mb == 1024
    assert a100.memory_free_mb == 79 * 1024
    assert a100.compute_capability == "8.0" and a100.bf16_supported is True
    assert t4.compute_capability == "7.5" and t4.bf16_supported is False
    assert a100.power_w == 312.5 and a100.power_limit_w == 400.0
    assert t4.power_w is None  # NotSupported becomes None, not a failure
    assert a100.driver_version == "550.54.15" and a100.cuda_driver_version == "12.4"
    assert a100.utilization_pct == 37 and a100.temperature_c == 55
    assert fake.inits == fake.shutdowns == 1
    assert probe.to_dict()["gpus"][1]["name"] == "Tesla T4"


def test_probe_notes_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: _FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert any("CUDA_VISIBLE_DEVICES" in n for n in probe_gpus().notes)


def test_probe_reports_a_driver_that_is_not_loaded(monkeypatch):
    fake = _FakeNvml()

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    fake.nvmlInit = fail
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: fake)
    probe = probe_gpus()
    assert probe.available is False and "not loaded" in (probe.reason or "")


def test_monitor_samples_and_closes(monkeypatch):
    fake = _FakeNvml(temps=[61, 62])
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: fake)
    mon = GpuMonitor(0, max_age_s=0)  # every sample a fresh reading
    assert mon.available
    s1, s2 = mon.sample(), mon.sample()
    assert s1 == {
        "temperature_c": 61,
        "memory_used_mb": 1024,
        "memory_total_mb": 80 * 1024,
        "memory_free_mb": 79 * 1024,
        "utilization_pct": 37,
        "power_w": 312.5,
    }
    assert s2 is not None and s2["temperature_c"] == 62
    assert fake.inits == 1  # initialised once, not per sample
    mon.close()
    assert mon.sample() is None and fake.shutdowns == 1
    bad = GpuMonitor(5)
    assert not bad.available and "GPU 5" in (bad.unavailable_reason or "")
    # by default a reading younger than half a second is given again (the loop asks twice a step)
    fake.temps = [70, 71]
    cached = GpuMonitor(0)
    t1, t2 = cached.sample(), cached.sample()
    assert t1 == t2 and t1 is not t2 and t1["temperature_c"] == 70 and fake.temps == [71]  # read once


def test_thermal_guard_pauses_with_hysteresis_and_stops_in_an_emergency():
    guard = ThermalGuard(
        SafetySettings(pause_temperature_c=85, resume_temperature_c=78, emergency_temperature_c=92)
    )
    seq = [70, 84, 85, 86, 80, 79, 78, 84, 90, 93]
    actions = [guard.decide({"temperature_c": t}).action for t in seq]
    assert actions == ["ok", "ok", "pause", "pause", "pause", "pause", "ok", "ok", "pause", "emergency"]
    d = ThermalGuard(SafetySettings()).decide({"temperature_c": 95})
    assert d.action == "emergency" and "95" in d.reason
    # No reading (CPU run, sensor missing): nothing to guard against.
    assert ThermalGuard(SafetySettings()).decide(None).action == "ok"
    assert ThermalGuard(SafetySettings()).decide({"temperature_c": None}).action == "ok"


def test_safety_settings_refuse_inconsistent_limits():
    with pytest.raises(ValueError, match="resume_temperature_c <= pause_temperature_c <= emergency"):
        SafetySettings(pause_temperature_c=80, resume_temperature_c=85)
