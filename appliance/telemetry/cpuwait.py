"""Time spent waiting for a CPU: how long a thread was ready to run while the machine ran others.

Linux keeps it per thread: the second field of `/proc/<pid>/task/<tid>/schedstat` is the time
the thread spent runnable on a run queue, in nanoseconds (the kernel's sched-stats.rst). Of a
timer that fired late or an answer that came slowly, that is the part the machine's load caused,
as opposed to the program itself: running, or blocked on a lock, the GIL or a disk. Where the
kernel keeps no such count (not Linux, or built without CONFIG_SCHED_INFO) every reading is 0, and
the caller sees plain wall time.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable


def thread_wait_s(pid: int, tid: int) -> float | None:
    """Seconds thread `tid` of process `pid` has waited for a CPU since it started; None when the
    thread is gone or the kernel does not say."""
    try:
        with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as file:
            return _parse(file.read())
    except (OSError, ValueError, IndexError):
        return None


def _parse(data: bytes) -> float:
    return int(data.split()[1]) / 1e9


class OwnThreadWait:
    """The calling thread's wait, cheaply read again and again (a kept descriptor: about 7 us a
    reading, against 75 us to open the file each time). Open it on the thread it is to measure."""

    def __init__(self) -> None:
        self._fd: int | None = None
        with contextlib.suppress(OSError):
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def waited_s(self) -> float:
        if self._fd is None:
            return 0.0
        try:
            return _parse(os.pread(self._fd, 64, 0))
        except (OSError, ValueError, IndexError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def process_threads() -> set[int]:
    """The native ids of this process's threads, as the kernel lists them."""
    try:
        return {int(name) for name in os.listdir("/proc/self/task")}
    except OSError:
        return set()


class OtherThreadsWait:
    """The other threads of this process (`threads`: by default every one the kernel lists; a test
    names its own): how long each has waited for a CPU, read through kept descriptors (the threads
    are listed again every `relist_every` readings; one new since then counts from 0, which is
    right for a thread that started since). Where the kernel keeps no count, every reading is
    empty."""

    def __init__(self, relist_every: int = 20, threads: Callable[[], set[int]] = process_threads) -> None:
        self.relist_every = relist_every
        self._threads = threads
        self._own = threading.get_native_id()
        self._fds: dict[int, int] = {}
        self._readings = 0

    def _relist(self) -> None:
        tids = self._threads() - {self._own}
        for tid in set(self._fds) - tids:
            os.close(self._fds.pop(tid))
        for tid in tids - set(self._fds):
            with contextlib.suppress(OSError):
                self._fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)

    def read(self) -> dict[int, float]:
        if self._readings % self.relist_every == 0:
            self._relist()
        self._readings += 1
        waits = {}
        for tid, fd in self._fds.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                waits[tid] = _parse(os.pread(fd, 64, 0))
        return waits

    @staticmethod
    def most_waited_s(before: dict[int, float], after: dict[int, float]) -> float:
        """The longest one thread waited for a CPU between two readings."""
        return max((wait - before.get(tid, 0.0) for tid, wait in after.items()), default=0.0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
