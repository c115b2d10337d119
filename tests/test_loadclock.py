"""LoadClock, the tests' stopwatch for "within N seconds": time a thread waits for a CPU is left
out, time it sleeps or works is not."""

from __future__ import annotations

import subprocess
import sys

from appliance.testing.loadclock import LoadClock
from tests.starvation import run_starved

IMPORTS = """
import time
from appliance.testing.loadclock import LoadClock
"""
KEPT_WAITING = """
clock, asleep = LoadClock(), 0.0
while asleep < 10 and time.monotonic() - clock.began - asleep < 0.3:  # until kept waiting 0.3 s
    time.sleep(0.025)
    asleep += 0.025
print(asleep, time.monotonic() - clock.began, clock.elapsed_s())
"""


def test_time_kept_waiting_for_a_cpu_is_left_out_and_sleep_is_not() -> None:
    asleep, wall, elapsed = map(float, run_starved(IMPORTS, KEPT_WAITING))
    assert wall - asleep >= 0.3, "the thread was hardly kept waiting: the test proves nothing"
    assert asleep <= elapsed < asleep + (wall - asleep) / 2, (asleep, wall, elapsed)


def test_an_idle_clock_reads_as_wall_time_and_counts_the_processes_it_watches() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        clock = LoadClock([sleeper.pid])
        assert len(clock._threads) == 2  # this thread, and the process's main thread
        assert clock.waited_s() >= 0
        assert clock.elapsed_s() <= 1
    finally:
        sleeper.kill()
