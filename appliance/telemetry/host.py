"""The host: memory, CPU use, and this daemon's own processes (psutil); never raises."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class HostReading:
    memory_total: int | None = None
    memory_used: int | None = None
    """Total less what is available to new work (page cache counts as available)."""
    cpu_pct: float | None = None
    """All cores together (100: every core busy), since the previous reading."""
    cpus: int | None = None


def host_reading() -> HostReading:
    total: int | None = None
    used: int | None = None
    cpu: float | None = None
    with contextlib.suppress(Exception):
        memory = psutil.virtual_memory()
        total, used = int(memory.total), int(memory.total - memory.available)
    with contextlib.suppress(Exception):
        cpu = float(psutil.cpu_percent(interval=None))  # since the previous call; a first call reads 0
    return HostReading(total, used, cpu, os.cpu_count())


def own_pids() -> frozenset[int]:
    """This process and its descendants (vLLM's engine core and workers)."""
    pid = os.getpid()
    try:
        children = psutil.Process(pid).children(recursive=True)
    except Exception:
        return frozenset({pid})
    return frozenset({pid, *(child.pid for child in children)})
