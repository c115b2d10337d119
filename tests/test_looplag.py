"""The event-loop lag monitor: it sees a blocked loop, and the live daemon reports it."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import sys
import threading
import time

from appliance.telemetry.cpuwait import OtherThreadsWait
from appliance.telemetry.looplag import LoopLag, LoopLagMonitor
from tests.conftest import admin_status
from tests.starvation import run_starved


async def test_a_blocked_loop_is_a_stall_with_its_length_logged(caplog):
    monitor = LoopLagMonitor(interval_s=0.01, stall_ms=100)
    with caplog.at_level(logging.WARNING, logger="appliance.telemetry.looplag"):
        async with monitor.running():
            await asyncio.sleep(0.05)
            time.sleep(0.25)  # noqa: ASYNC251 (holds the loop, as a synchronous scan or parse would)
            await asyncio.sleep(0.05)
    lag = monitor.snapshot()
    assert lag.stalls == 1
    assert 150 <= lag.max_ms < 1000
    assert "event loop stalled" in caplog.text


async def test_an_idle_loop_has_no_stall():
    monitor = LoopLagMonitor(interval_s=0.01, stall_ms=100)
    async with monitor.running():
        await asyncio.sleep(0.3)
    assert monitor.snapshot().stalls == 0


def test_the_daemon_reports_its_loop_lag(server):
    lag = admin_status(server.demo)["loop_lag"]
    assert set(lag) == {"last_ms", "max_ms", "stalls", "stall_ms"}
    assert lag["stall_ms"] == 100


def test_start_up_does_not_hold_the_event_loop(server):
    """While the engine loads, /healthz must answer: nothing in start-up holds the loop for long.

    (Importing vLLM inside the engine's start held it for 2.1 s.) A loaded CI box adds scheduling
    jitter of a few hundred ms, hence the bound of 500 ms rather than the 100 ms stall threshold."""
    log = server.local.log_path.read_text(errors="replace")
    start_up = log.split("ready in", 1)[0]
    stalls = [float(ms) for ms in re.findall(r"event loop stalled for (\d+) ms", start_up)]
    assert max(stalls, default=0) < 500, stalls


IMPORTS = """
import asyncio, time
from appliance.telemetry.looplag import LoopLag, LoopLagMonitor
"""
KEPT_WAITING = """
async def main():
    monitor, worst = LoopLagMonitor(interval_s=0.01, stall_ms=100), 0.0
    async with monitor.running():
        for _ in range(2000):  # until the loop has been kept waiting well past the threshold
            due = time.perf_counter() + 0.01
            await asyncio.sleep(0.01)
            worst = max(worst, time.perf_counter() - due)
            if worst > 0.15:
                break
    print(monitor.snapshot().stalls, worst)

asyncio.run(main())
"""


def test_a_loop_kept_waiting_for_a_cpu_is_not_a_stall():
    """A loop starved of CPU by other work (busy loops on its one CPU, at a higher priority) wakes
    up late, but nothing held it: what the machine's load costs is left out of the count."""
    stalls, worst_s = run_starved(IMPORTS, KEPT_WAITING)
    assert float(worst_s) > 0.15, "the loop was never kept waiting: the test proves nothing"
    assert int(stalls) == 0


class MachineTookTheGilHolder(OtherThreadsWait):
    """Another thread's readings as the kernel gives them when the machine took the CPU from it
    for 300 ms while it held the GIL: its wait grows by that much between any two readings."""

    def __init__(self) -> None:
        super().__init__()
        self.wait_s = 0.0

    def read(self) -> dict[int, float]:
        self.wait_s += 0.3
        return {1234: self.wait_s}


async def test_a_loop_kept_waiting_by_a_thread_the_machine_stopped_is_not_a_stall():
    """The loop's thread waited (here: blocked 250 ms) while another thread of the process, which
    held the GIL, waited for a CPU as long: the machine's load, left out like the loop thread's own
    wait for a CPU. (The kernel's counts themselves: test_a_thread_holding_the_gil... below.)"""
    monitor = LoopLagMonitor(interval_s=0.01, stall_ms=100, other_threads=MachineTookTheGilHolder)
    async with monitor.running():
        await asyncio.sleep(0.05)
        time.sleep(0.25)  # noqa: ASYNC251 (the loop's thread waiting, as for the GIL)
        await asyncio.sleep(0.05)
    assert monitor.snapshot().stalls == 0


async def test_a_thread_holding_the_gil_in_one_long_call_is_a_stall():
    """What the threads' CPU waits leave out is only what the machine took (the kernel's counts,
    read for real): a thread that holds the GIL while it runs (one long call in C, which never
    hands it over) holds the loop, and counts. The monitor reads that thread alone: another thread
    of this process that the busy machine kept waiting as long would hide the stall (the count
    errs toward the machine, module docstring), and pytest's process has threads of its own.

    The GIL's switch interval is 1 s meanwhile: a thread waiting for the GIL wakes every interval
    (5 ms by default) to ask for it, and on a busy machine each wake-up waits for a CPU, which
    the loop thread's own count then leaves out although the holder's wait overlaps it (measured
    with busy processes beside it: the holder's 300 ms counted as 134-214 ms, once under 100; with
    1 s, 198-374 ms). With the interval the loop's thread sleeps until the holder lets go.

    Beside a busy machine and the rest of the suite a hold was still left out whole once (a loaded
    rehearsal: max 0.41 ms): the count errs toward the machine, so the hold is tried up to three
    times, each with a monitor of its own; a monitor that never counts such a hold fails all three."""
    seen = []
    for _ in range(3):
        lag = await _hold_the_gil_for_300_ms()
        if lag.stalls >= 1 and lag.max_ms > 100:
            return
        seen.append(lag)
    raise AssertionError(f"no hold of the GIL counted as a stall in 3 tries: {seen}")


async def _hold_the_gil_for_300_ms() -> LoopLag:
    """A thread holds the GIL in one C call of about 300 ms of CPU while a monitor watches the loop."""
    began = time.thread_time()  # CPU time: what the call costs, however busy the machine is
    sum(range(1_000_000))
    count = int(1_000_000 * 0.3 / (time.thread_time() - began))  # about 300 ms of CPU in one C call
    go = threading.Event()

    def hold() -> None:
        go.wait()
        sum(range(count))

    holder = threading.Thread(target=hold, name="gil-holder")
    holder.start()
    monitor = LoopLagMonitor(
        interval_s=0.01,
        stall_ms=100,
        other_threads=lambda: OtherThreadsWait(threads=lambda: {holder.native_id}),
    )
    switch_interval = sys.getswitchinterval()
    async with monitor.running():
        await asyncio.sleep(0.05)
        sys.setswitchinterval(1.0)
        try:
            go.set()
            await asyncio.to_thread(holder.join)
        finally:
            sys.setswitchinterval(switch_interval)
        await asyncio.sleep(0.05)
    return monitor.snapshot()


def test_every_other_thread_of_the_process_is_read():
    """A thread of a C library (here one started through libc, asleep in sleep(1)) holds no GIL,
    but its wait for a CPU counts like any other's: the count errs toward the machine (module
    docstring of looplag.py); the loop's own thread is not read."""
    libc = ctypes.CDLL(None)
    c_thread = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(c_thread), None, ctypes.cast(libc.sleep, ctypes.c_void_p), 1) == 0
    try:
        known = {thread.native_id for thread in threading.enumerate()}
        tids = {int(name) for name in os.listdir("/proc/self/task")}
        others = OtherThreadsWait()
        read = others.read()
        others.close()
    finally:
        libc.pthread_join(c_thread, None)
    assert tids - known  # the C thread, at least
    assert set(read) == tids - {threading.get_native_id()}
