"""GPU and host readings for the admin API and /metrics, taken off the event loop.

`DeviceSampler.read()` gives the latest reading, taken on a thread of its own at most once per
`ttl_s` however many callers ask (TUI ticks, scrapes, `lorabox status`). A reading that takes
longer than `wait_s` (NVML stuck on a GPU that fell off the bus) is not waited for: callers get
the previous one, and no second thread starts while the first is stuck. The thread is a daemon
thread, so a stuck NVML call cannot hold up the daemon's exit either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .gpu import GpuReading, gpu_readings
from .host import HostReading, host_reading, own_pids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceReading:
    gpus: tuple[GpuReading, ...] = ()
    host: HostReading = field(default_factory=HostReading)


def take_reading() -> DeviceReading:
    """Every GPU (with this daemon's processes' memory on each) and the host; blocking."""
    return DeviceReading(tuple(gpu_readings(own_pids())), host_reading())


class DeviceSampler:
    def __init__(
        self,
        take: Callable[[], DeviceReading] = take_reading,
        ttl_s: float = 1.0,
        wait_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._take, self.ttl_s, self.wait_s, self._clock = take, ttl_s, wait_s, clock
        self._latest = DeviceReading()
        self._taken_at = -float("inf")
        self._pending: asyncio.Future[DeviceReading] | None = None

    async def read(self) -> DeviceReading:
        if self._clock() - self._taken_at < self.ttl_s:
            return self._latest
        if self._pending is None:
            self._pending = self._start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pending), self.wait_s)
        return self._latest

    def _start(self) -> asyncio.Future[DeviceReading]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DeviceReading] = loop.create_future()

        def settle(reading: DeviceReading | None) -> None:
            self._pending = None
            if reading is not None:
                self._latest, self._taken_at = reading, self._clock()
            if not future.done():
                future.set_result(self._latest)

        def run() -> None:
            reading = None
            try:
                reading = self._take()
            except Exception:  # the readers never raise; a bug must not wedge the sampler
                log.exception("reading the GPUs and the host failed")
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                loop.call_soon_threadsafe(settle, reading)

        threading.Thread(target=run, name="lorabox-device-reading", daemon=True).start()
        return future
