"""GPU 0's name, memory and compute capability from NVML; never raises.

No driver, no GPU or an NVML error all read as None (shown as N/A). NVML is initialised once, on
first use; results are kept for TTL_SECONDS so a dashboard can poll without hammering the driver.
Calls block briefly: poll from a thread, not the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
    free: int


def _cached(key: str, read: Callable[[Any], T]) -> T | None:
    """read(handle of GPU 0), remembered for TTL_SECONDS; None on any NVML failure."""
    global _nvml_ready
    with _lock:
        now = _clock()
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < TTL_SECONDS:
            return hit[1]
        if _nvml_ready is None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except Exception:
                _nvml_ready = False
        value: T | None = None
        if _nvml_ready:
            try:
                value = read(pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:
                value = None
        _cache[key] = (now, value)
        return value


def _memory(handle: Any) -> GpuMemory:
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
