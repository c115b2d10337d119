"""LoadClock, the tests' stopwatch for "within N seconds": time a thread waits for a CPU is left
out, time it sleeps or works is not."""

from __future__ import annotations

import subprocess
import sys

from appliance.testing.loadclock import LoadClock

STARVED = """
import os, subprocess, sys, time
from appliance.testing.loadclock import LoadClock

cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})
busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
for process in busy:
    os.sched_setaffinity(process.pid, {cpu})
os.nice(19)  # the busy loops get some 99% of the one CPU
try:
    clock = LoadClock()
    for _ in range(20):
        time.sleep(0.025)  # 0.5 s asleep in all, each wake-up late
    print(time.monotonic() - clock.began, clock.elapsed_s())
finally:
    for process in busy:
        process.kill()
"""


def test_time_kept_waiting_for_a_cpu_is_left_out_and_sleep_is_not() -> None:
    command = [sys.executable, "-c", STARVED]
    wall, elapsed = map(
        float, subprocess.run(command, capture_output=True, text=True, timeout=120).stdout.split()
    )
    assert wall > 0.6, "the thread was hardly kept waiting: the test proves nothing"
    assert 0.5 <= elapsed < 0.5 + (wall - 0.5) / 2, (wall, elapsed)


def test_an_idle_clock_reads_as_wall_time_and_counts_the_processes_it_watches() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        clock = LoadClock([sleeper.pid])
        assert len(clock._threads) == 2  # this thread, and the process's main thread
        assert clock.waited_s() >= 0
        assert clock.elapsed_s() <= 1
    finally:
        sleeper.kill()
