"""Background work that leaves the event loop its share of the CPU.

Judging 10,000 folders or snapshotting them is seconds of pure Python on a worker thread. That
thread shares the interpreter lock, and on a busy box the CPU, with the event loop that serves
every tenant: left to run flat out, it makes the loop wait for both. So such loops call a Pacer
once per item: it lets the work run for a slice (10 ms), then sleeps as long again, which keeps
the work to half of one CPU in short bursts, and the loop is never behind it for long.
"""

from __future__ import annotations

import time


class Pacer:
    def __init__(self, slice_s: float = 0.01, share: float = 0.5):
        self.slice_s = slice_s
        self._rest = (1 - share) / share
        self._began = time.perf_counter()

    def __call__(self) -> None:
        worked = time.perf_counter() - self._began
        if worked >= self.slice_s:
            time.sleep(worked * self._rest)
            self._began = time.perf_counter()
