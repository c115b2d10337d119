"""How late the event loop runs: a ticker that measures its own lateness.

Every request, stream and admin call of every tenant shares one event loop, so anything that holds
it (a tenant's huge input, a scan of a big folder, a synchronous disk write) delays them all. The
monitor sleeps `interval_s` at a time and records how much later than asked it woke up, less the
time its thread spent waiting for a CPU meanwhile (cpuwait.py): on a machine busy with other work
the loop is late without anything holding it, and a count that rose with the machine's load would
point an operator, and the tests, at code that did nothing wrong. A wake-up later than the
threshold on that count is looked at once more: the loop's thread may have waited for the GIL,
held by another thread of the process that the machine had taken the CPU from (a thread waiting
for the GIL is not waiting for a CPU, so its own count misses it). The longest wait for a CPU of
any other thread meanwhile is left out too. A thread that holds the GIL while running (one long
call in C) waits for nothing: that stall counts. Which thread held the GIL the kernel does not
say, so the count errs toward the machine: on a busy machine a stall is missed where another
thread of the process waited for a CPU as long, and a thread waiting for the GIL wakes every
switch interval (5 ms) to ask for it, each wake-up a wait for a CPU of the loop's own thread that
is left out although it overlaps the holder's (with busy processes beside it, a 300 ms hold
counted 134-214 ms). A wake-up more than `stall_ms` late on that count is a stall: counted, and
logged as a warning with its length, so a stall in production is visible in the log and (through
`snapshot`) in the admin API and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .. import background
from .cpuwait import OtherThreadsWait, OwnThreadWait

log = logging.getLogger(__name__)

STALL_MS = 100.0


@dataclass(frozen=True)
class LoopLag:
    last_ms: float
    """Lateness of the most recent tick (time its thread waited for a CPU left out, as in all three)."""
    max_ms: float
    """Worst lateness since the monitor started."""
    stalls: int
    """Ticks later than the stall threshold, since the monitor started."""
    stall_ms: float
    """The threshold."""


class LoopLagMonitor:
    def __init__(
        self,
        interval_s: float = 0.05,
        stall_ms: float = STALL_MS,
        other_threads: Callable[[], OtherThreadsWait] = OtherThreadsWait,
    ):
        self.interval_s = interval_s
        self.stall_ms = stall_ms
        self._other_threads = other_threads
        self._last_ms = 0.0
        self._max_ms = 0.0
        self._stalls = 0

    def snapshot(self) -> LoopLag:
        return LoopLag(
            last_ms=round(self._last_ms, 2),
            max_ms=round(self._max_ms, 2),
            stalls=self._stalls,
            stall_ms=self.stall_ms,
        )

    def observe(self, late_ms: float) -> None:
        """Record one tick that woke `late_ms` after it was due."""
        self._last_ms = late_ms
        self._max_ms = max(self._max_ms, late_ms)
        if late_ms > self.stall_ms:
            self._stalls += 1
            log.warning("event loop stalled for %.0f ms (threshold %.0f ms)", late_ms, self.stall_ms)

    async def _tick(self) -> None:
        cpu_wait, others = OwnThreadWait(), self._other_threads()  # opened here: on the loop's thread
        try:
            while True:
                due, waited, before = (
                    time.perf_counter() + self.interval_s,
                    cpu_wait.waited_s(),
                    others.read(),
                )
                await asyncio.sleep(self.interval_s)
                late = time.perf_counter() - due - (cpu_wait.waited_s() - waited)
                if late * 1000 > self.stall_ms:
                    late -= others.most_waited_s(before, others.read())
                self.observe(max(0.0, late * 1000))
        finally:
            cpu_wait.close()
            others.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopLagMonitor]:
        async with background.running(self._tick(), name="loop-lag monitor"):
            yield self
