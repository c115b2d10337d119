"""The GPUs, from NVML (nvidia-ml-py); never raises.

No driver, no GPU or an NVML error read as None (shown as N/A): a whole value for the functions
about GPU 0 that pick and size the engine (`gpu_memory`, `gpu_name`, `gpu_compute_capability`,
kept for TTL_SECONDS), one field of one reading for `gpu_readings` (every GPU, for dashboards).
NVML is initialised once, on first use; a failed initialisation is not retried.

Calls block (briefly; a GPU that fell off the bus can make them block long): call from a thread,
never from the event loop. telemetry/device.py polls `gpu_readings` that way, with its own TTL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

import pynvml

T = TypeVar("T")
TTL_SECONDS = 1.0
_clock = time.monotonic
_lock = threading.Lock()
_nvml_ready: bool | None = None  # None: not tried yet; a failed nvmlInit is not retried
_cache: dict[str, tuple[float, Any]] = {}


@dataclass(frozen=True)
class GpuMemory:
    total: int
    used: int
    """Without the driver's reserved memory where NVML has its v2 memory call (as nvidia-smi)."""
    free: int


@dataclass(frozen=True)
class GpuReading:
    """One GPU now; each field None where NVML cannot tell."""

    index: int
    name: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    process_memory: int | None = None
    """GPU memory of the processes asked about (the daemon and its engine's children)."""


def _initialised() -> bool:
    """Whether NVML is usable; call with _lock held."""
    global _nvml_ready
    if _nvml_ready is None:
        try:
            pynvml.nvmlInit()
            _nvml_ready = True
        except Exception:
            _nvml_ready = False
    return _nvml_ready


def _or_none(read: Callable[..., T], *args: Any) -> T | None:
    try:
        return read(*args)
    except Exception:  # NVMLError of every kind, and whatever a broken binding raises
        return None


def _cached(key: str, read: Callable[[Any], T]) -> T | None:
    """read(handle of GPU 0), remembered for TTL_SECONDS; None on any NVML failure."""
    with _lock:
        now = _clock()
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < TTL_SECONDS:
            return hit[1]
        value = _or_none(lambda: read(pynvml.nvmlDeviceGetHandleByIndex(0))) if _initialised() else None
        _cache[key] = (now, value)
        return value


def _memory(handle: Any) -> GpuMemory:
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
    except Exception:  # a driver without the v2 call: its `used` counts the reserved memory too
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return GpuMemory(total=int(info.total), used=int(info.used), free=int(info.free))


def _name(handle: Any) -> str:
    name = pynvml.nvmlDeviceGetName(handle)
    return name.decode() if isinstance(name, bytes) else str(name)  # bytes from older bindings


def gpu_memory() -> GpuMemory | None:
    """Total, used and free bytes of GPU 0, or None where NVML cannot tell."""
    return _cached("memory", _memory)


def gpu_name() -> str | None:
    """GPU 0's product name, or None where NVML cannot tell."""
    return _cached("name", _name)


def _compute_capability(handle: Any) -> tuple[int, int]:
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    return int(major), int(minor)


def gpu_compute_capability() -> tuple[int, int] | None:
    """GPU 0's CUDA compute capability (major, minor), or None where NVML cannot tell."""
    return _cached("compute_capability", _compute_capability)


def _process_memory(handle: Any, pids: Collection[int]) -> int | None:
    """GPU memory held by `pids`; None when none of them shows (in a container NVML may list the
    host's pids) or the driver does not say."""
    used: dict[int, int] = {}
    for list_processes in (
        pynvml.nvmlDeviceGetComputeRunningProcesses,
        pynvml.nvmlDeviceGetGraphicsRunningProcesses,
    ):
        for process in _or_none(list_processes, handle) or []:
            memory = getattr(process, "usedGpuMemory", None)
            if process.pid in pids and isinstance(memory, int):
                used[process.pid] = memory
    return sum(used.values()) if used else None


def _reading(index: int, pids: Collection[int]) -> GpuReading:
    handle = _or_none(pynvml.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return GpuReading(index)
    memory = _or_none(_memory, handle)
    utilization = _or_none(pynvml.nvmlDeviceGetUtilizationRates, handle)
    power_mw = _or_none(pynvml.nvmlDeviceGetPowerUsage, handle)
    limit_mw = _or_none(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    temperature = _or_none(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
    return GpuReading(
        index=index,
        name=_or_none(_name, handle),
        memory_total=memory.total if memory else None,
        memory_used=memory.used if memory else None,
        utilization_pct=_number(getattr(utilization, "gpu", None)),
        temperature_c=_number(temperature),
        power_w=_number(power_mw, 1000),
        power_limit_w=_number(limit_mw, 1000),
        process_memory=_or_none(_process_memory, handle, pids),
    )


def _number(value: Any, divisor: float = 1) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return round(value / divisor, 1)


def gpu_readings(pids: Collection[int] = ()) -> list[GpuReading]:
    """Every GPU NVML sees (empty without NVML), with the GPU memory of `pids` on each."""
    with _lock:
        if not _initialised():
            return []
        count = _or_none(pynvml.nvmlDeviceGetCount)
        if not isinstance(count, int):
            return []
        return [_reading(index, pids) for index in range(count)]
