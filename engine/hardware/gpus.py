"""GPU probing and monitoring through NVML (``pynvml`` from ``nvidia-ml-py``), without torch.

The server calls :func:`probe_gpus` to describe the machine, and the worker samples its card every
step with :class:`GpuMonitor` and asks :class:`ThermalGuard` whether to go on, pause or stop.
A machine with no NVIDIA driver is a normal case: NVML raises ``NVMLError_LibraryNotFound`` and the
probe says "no GPU" plainly instead of failing.

GPU indices are NVML's (the order ``nvidia-smi`` shows). They match CUDA's order only when
``CUDA_DEVICE_ORDER=PCI_BUS_ID``; :func:`probe_gpus` notes it when ``CUDA_VISIBLE_DEVICES`` is set.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from engine.contract.events import EventWriter
from engine.contract.spec import SafetySettings

_MIB = 1024 * 1024
_T = TypeVar("_T")

# nvmlInit/nvmlShutdown are reference-counted by NVML itself; a lock keeps our own count honest
# when the server probes from several threads.
_nvml_lock = threading.Lock()


@dataclass
class GpuInfo:
    index: int
    name: str
    memory_total_mb: int
    memory_free_mb: int
    memory_used_mb: int
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    power_limit_w: float | None
    compute_capability: str | None  # "8.0"
    bf16_supported: bool  # compute capability >= 8.0 (Ampere and newer)
    driver_version: str | None
    cuda_driver_version: str | None  # the CUDA version the driver supports, "12.4"

    def free_text(self) -> str:
        free, total = self.memory_free_mb / 1024, self.memory_total_mb / 1024
        return f"GPU {self.index}: {self.name}, {free:.1f} of {total:.1f} GiB free"


@dataclass
class GpuProbe:
    available: bool
    gpus: list[GpuInfo] = field(default_factory=list)
    reason: str | None = None  # why no GPU is usable, in words
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import_pynvml() -> Any:
    import pynvml  # in a function: tests replace it with a fake NVML

    return pynvml


def _describe_nvml_error(exc: BaseException) -> str:
    """A sentence for an NVML failure; a missing library or driver is the ordinary no-GPU case."""
    pynvml = _import_pynvml()
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA driver (NVML library not found): no NVIDIA GPU is usable on this machine"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "the NVIDIA driver is installed but not loaded (NVML: driver not loaded)"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to query the NVIDIA driver (NVML: insufficient permissions)"
    return f"NVML could not be initialised: {exc}"


def _safe(fn: Callable[[], _T]) -> _T | None:
    """Call one NVML query; some cards or drivers don't support every query (NVMLError_NotSupported)."""
    pynvml = _import_pynvml()
    try:
        return fn()
    except pynvml.NVMLError:
        return None


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_version_string(raw: int | None) -> str | None:
    # NVML encodes the CUDA driver version as 1000*major + 10*minor (12040 -> "12.4").
    if raw is None:
        return None
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def _readings(pynvml: Any, handle: Any) -> dict[str, Any]:
    """What changes from moment to moment: memory, load, temperature, power (None where unsupported)."""
    mem = _safe(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    util = _safe(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
    temp = _safe(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    power_mw = _safe(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    return {
        "temperature_c": int(temp) if temp is not None else None,
        "memory_used_mb": int(mem.used // _MIB) if mem is not None else None,
        "memory_total_mb": int(mem.total // _MIB) if mem is not None else None,
        "memory_free_mb": int(mem.free // _MIB) if mem is not None else None,
        "utilization_pct": int(util.gpu) if util is not None else None,
        "power_w": round(power_mw / 1000.0, 1) if power_mw is not None else None,
    }


def _gpu_info(pynvml: Any, index: int, driver: str | None, cuda: str | None) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    limit_mw = _safe(lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle))
    cc = _safe(lambda: pynvml.nvmlDeviceGetCudaComputeCapability(handle))
    return GpuInfo(
        index=index,
        name=_as_str(pynvml.nvmlDeviceGetName(handle)),
        **_readings(pynvml, handle),
        power_limit_w=round(limit_mw / 1000.0, 1) if limit_mw is not None else None,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
        bf16_supported=cc is not None and cc[0] >= 8,
        driver_version=driver,
        cuda_driver_version=cuda,
    )


def _start_nvml() -> tuple[Any, str | None]:
    """(pynvml, initialised) or (None, why NVML cannot be used)."""
    try:
        pynvml = _import_pynvml()
    except ImportError:
        return None, "the nvidia-ml-py package (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, _describe_nvml_error(exc)
    return pynvml, None


def probe_gpus() -> GpuProbe:
    """Describe every NVIDIA GPU NVML can see. Never raises: a failure becomes ``reason``."""
    with _nvml_lock:
        pynvml, reason = _start_nvml()
        if pynvml is None:
            return GpuProbe(False, reason=reason)
        try:
            driver = _safe(lambda: _as_str(pynvml.nvmlSystemGetDriverVersion()))
            cuda = _cuda_version_string(_safe(pynvml.nvmlSystemGetCudaDriverVersion))
            count = pynvml.nvmlDeviceGetCount()
            gpus = [_gpu_info(pynvml, i, driver, cuda) for i in range(count)]
        except pynvml.NVMLError as exc:
            return GpuProbe(False, reason=f"NVML failed while reading the GPUs: {exc}")
        finally:
            _safe(pynvml.nvmlShutdown)
    if not gpus:
        return GpuProbe(False, reason="the NVIDIA driver is loaded but reports no GPU")
    notes = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        notes.append(
            f"CUDA_VISIBLE_DEVICES={visible!r} is set: indices here are NVML's (all cards), "
            "which can differ from the CUDA index a training job sees"
        )
    return GpuProbe(True, gpus=gpus, notes=notes)


class GpuMonitor:
    """Cheap per-step readings of one GPU; ``sample()`` returns None when NVML is unavailable.

    NVML is initialised once and the device handle kept. A reading is four driver calls, and the
    training loop asks twice a step (the thermal guard, the progress event): a reading younger than
    ``max_age_s`` is given again instead, so a step of a few tens of milliseconds does not spend a
    tenth of its time in NVML (temperature and memory move over seconds, not milliseconds).
    """

    def __init__(self, index: int = 0, max_age_s: float = 0.5) -> None:
        self.index = index
        self.max_age_s = max_age_s
        self._last: tuple[float, dict[str, Any]] | None = None
        self._pynvml: Any = None
        self._handle: Any = None
        pynvml, self.unavailable_reason = _start_nvml()
        if pynvml is None:
            return
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as exc:
            self.unavailable_reason = f"GPU {index} not found by NVML: {exc}"
            _safe(pynvml.nvmlShutdown)
            return
        self._pynvml = pynvml

    @property
    def available(self) -> bool:
        return self._handle is not None

    def sample(self) -> dict[str, Any] | None:
        if self._handle is None:
            return None
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.max_age_s:
            return dict(self._last[1])
        reading = _readings(self._pynvml, self._handle)
        self._last = (now, reading)
        return dict(reading)

    def close(self) -> None:
        if self._handle is not None:
            self._handle = None
            _safe(self._pynvml.nvmlShutdown)

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ThermalAction = Literal["ok", "pause", "emergency"]


@dataclass
class ThermalDecision:
    action: ThermalAction
    reason: str
    temperature_c: float | None


class ThermalGuard:
    """Decide, from one reading at a time, whether training may go on.

    - at or above ``emergency_temperature_c``: "emergency" (checkpoint and stop);
    - at or above ``pause_temperature_c``: "pause" (wait between steps);
    - once paused, stay paused until the card has cooled to ``resume_temperature_c`` or below
      (hysteresis, so training does not flap around the pause threshold);
    - no temperature reading (no GPU, NVML without a sensor): "ok".
    Pure logic: the caller supplies samples (``GpuMonitor.sample()``) and does the sleeping.
    """

    def __init__(self, settings: SafetySettings) -> None:  # its limits are in order (checked by the spec)
        self.settings = settings
        self.paused = False

    def decide(self, sample: dict[str, Any] | None) -> ThermalDecision:
        s = self.settings
        temp = sample.get("temperature_c") if sample else None
        if temp is None:
            return ThermalDecision("ok", "no temperature reading", None)
        if temp >= s.emergency_temperature_c:
            return ThermalDecision(
                "emergency",
                f"GPU at {temp} °C, at or above the emergency limit {s.emergency_temperature_c} °C",
                temp,
            )
        if self.paused:
            if temp <= s.resume_temperature_c:
                self.paused = False
                return ThermalDecision(
                    "ok", f"GPU cooled to {temp} °C (resume at {s.resume_temperature_c} °C)", temp
                )
            return ThermalDecision(
                "pause", f"GPU at {temp} °C, waiting to cool to {s.resume_temperature_c} °C", temp
            )
        if temp >= s.pause_temperature_c:
            self.paused = True
            return ThermalDecision(
                "pause", f"GPU at {temp} °C, at or above the pause limit {s.pause_temperature_c} °C", temp
            )
        return ThermalDecision("ok", f"GPU at {temp} °C", temp)


class GpuOverheated(RuntimeError):
    """The card stayed too hot; the job saved its progress and stopped."""


GPU_WAIT_POLL_S = 5.0


def wait_for_safe_gpu(
    monitor: Any,
    guard: ThermalGuard,
    events: EventWriter,
    *,
    before: str,
    max_wait_s: float,
    save_progress: Callable[[], None] = lambda: None,
    needed_free_mb: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Hold off ``before`` (a step, a run) while the card is too hot or too full; returns the seconds waited.

    Waiting is the remedy, since nothing computes meanwhile. At the emergency line, or when the card
    is still too hot after ``max_wait_s``, ``save_progress`` runs (a checkpoint) and the job stops
    with GpuOverheated; running it again resumes it. A card still short of ``needed_free_mb`` after
    ``max_wait_s`` is let go, because training backs off on out-of-memory by itself.
    """
    if monitor is None:
        return 0.0
    started = clock()
    warned = False
    while True:
        sample = monitor.sample()
        decision = guard.decide(sample)
        waited = clock() - started
        free_mb = None
        if sample and sample.get("memory_total_mb") is not None and sample.get("memory_used_mb") is not None:
            free_mb = sample["memory_total_mb"] - sample["memory_used_mb"]
        short_of_memory = needed_free_mb is not None and free_mb is not None and free_mb < needed_free_mb
        if decision.action == "ok" and not short_of_memory:
            if warned:
                events.log(f"GPU ready again after {waited:.0f} s ({decision.reason}); starting {before}")
            return waited
        if decision.action == "emergency" or (decision.action != "ok" and waited > max_wait_s):
            save_progress()
            raise GpuOverheated(
                f"{decision.reason}; waited {waited:.0f} s before {before}. Progress is saved: improve "
                "cooling or lower the load, then run the job again to resume"
            )
        if waited > max_wait_s:
            events.warning(
                f"only {free_mb} MB of GPU memory free after waiting {waited:.0f} s (the last run peaked at "
                f"{needed_free_mb:.0f} MB); starting {before} anyway, training backs off on out-of-memory"
            )
            return waited
        if not warned:
            why = decision.reason if decision.action != "ok" else f"only {free_mb} MB of GPU memory free"
            events.warning(f"delaying {before}: {why}", gpu=sample)
            warned = True
        sleep(GPU_WAIT_POLL_S)
