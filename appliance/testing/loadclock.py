"""A stopwatch for "answered within N seconds" on a shared machine: wall time less the time the
threads that carry the work waited for a CPU.

On a machine that runs other work beside the box (CI's two cores with the rest of the suite, a
developer's laptop), a request can take seconds that the box never had: its threads were ready
and the machine ran something else. A bound on wall time then fails or passes with the machine's
load. This clock leaves that time out (telemetry/cpuwait.py), so a bound on it fails only when the
box itself was slow: running, or blocked on a lock, the GIL, a disk or a stuck engine.

The watched threads are those that hand a request along, one after another: the calling thread
(the client), and the main thread of the server process and of each process under it (lorabox's
event loop, vLLM's engine core loop, its worker). Where several of them wait at the same moment
each wait is left out, so under load the clock runs slower than the box's own time and a bound
on it is only more lenient; on an idle machine nothing waits and it reads as wall time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import psutil

from ..telemetry.cpuwait import thread_wait_s

T = TypeVar("T")


class LoadClock:
    """Started at construction. The client is the constructing thread unless `client_tid` names
    another of this process. The processes are looked up at the start, and again every
    `refresh_s` where processes come later (a server starting its engine): one that came counts
    from its own start. Between look-ups a reading costs a few file reads."""

    def __init__(
        self, pids: Iterable[int] = (), client_tid: int | None = None, refresh_s: float | None = None
    ):
        self._client = (os.getpid(), client_tid or threading.get_native_id())
        self._roots, self._refresh_s = list(pids), refresh_s
        self._threads, self._looked_up = self._lookup(), time.monotonic()
        self.began = time.monotonic()
        self._first = self._read()
        self._last = dict(self._first)

    def _lookup(self) -> list[tuple[int, int]]:
        threads = [self._client]
        for pid in self._roots:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                threads += [(p.pid, p.pid) for p in [root, *root.children(recursive=True)]]
        return threads

    def _read(self) -> dict[tuple[int, int], float]:
        return {thread: s for thread in self._threads if (s := thread_wait_s(*thread)) is not None}

    def waited_s(self) -> float:
        """Seconds the watched threads waited for a CPU since the clock started, summed (a thread
        that has ended counts what it had waited by the last reading)."""
        if self._refresh_s is not None and time.monotonic() - self._looked_up >= self._refresh_s:
            self._threads, self._looked_up = self._lookup(), time.monotonic()
        self._last |= self._read()
        return sum(waited - self._first.get(thread, 0.0) for thread, waited in self._last.items())

    def elapsed_s(self) -> float:
        """Wall seconds since the clock started, less `waited_s()`: a difference of two readings
        times what happened between them."""
        return time.monotonic() - self.began - self.waited_s()


def wait_within(
    clock: LoadClock, seconds: float, condition: Callable[[], T], what: str, poll_s: float = 0.05
) -> T:
    """`condition()`'s first true value, polled; an AssertionError once `seconds` of `clock` have
    passed since the call without one. A machine so busy that the clock hardly moves still ends
    the wait, after 2 minutes plus 10 times `seconds` of wall time: a hang is reported, never
    waited out."""
    began, free = time.monotonic(), clock.elapsed_s()
    while not (value := condition()):
        took, wall = clock.elapsed_s() - free, time.monotonic() - began
        failure = f"{what}: not within {seconds} s ({took:.2f} s less waits for a CPU; {wall:.2f} s of wall)"
        assert took < seconds, failure
        assert wall < 120 + 10 * seconds, failure
        time.sleep(poll_s)
    return value
