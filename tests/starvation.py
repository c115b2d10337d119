"""Running a piece of Python starved of CPU: for the tests of what leaves a CPU's wait out
(appliance/testing/loadclock.py, appliance/telemetry/looplag.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Pinned to one CPU beside two busy loops, at SCHED_IDLE: it runs only when they let it (nice 19
# alone is not enough under EEVDF, which woke a sleeper only 2-5 ms late).
STARVE = """
import os, subprocess, sys

cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {cpu})
busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
for process in busy:
    os.sched_setaffinity(process.pid, {cpu})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
"""

KILL_BUSY = """
finally:
    for process in busy:
        process.kill()
"""


def run_starved(imports: str, code: str) -> list[str]:
    """What `code` prints, split into words, run in a process of its own starved of CPU once
    `imports` have run (at full speed: they are not what is measured)."""
    script = imports + STARVE + "try:\n" + textwrap.indent(code, "    ") + KILL_BUSY
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
