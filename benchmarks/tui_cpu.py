"""The TUI's own CPU use: `lorabox tui` in a real pseudo-terminal (160x45) against recorded payloads.

    .venv/bin/python benchmarks/tui_cpu.py [--seconds 60] [--interval 2]

The recorded admin-API payloads (tests/fixtures/admin) are served on a Unix socket by the replay
server, in this process. `python -m appliance tui` runs as a child on a pty of 160x45 whose output
is read and thrown away, as a terminal would. Two runs: the recording as it is (`still`), and with
every tenant's numbers and history changing on every tick (`moving`, the worst case: every row
redraws). After a warm-up, the child's user+system CPU time (/proc/PID/stat) over `--seconds` is
printed as a percentage of one core, with the bytes it wrote to the terminal.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from appliance.testing.adminreplay import AdminReplay

COLUMNS, ROWS = 160, 45
WARMUP_S = 8.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keep_moving(replay: AdminReplay, interval_s: float, stop: threading.Event) -> None:
    """Every tick, every tenant's rates change and its history moves on by one point."""
    tick = 0
    while not stop.wait(interval_s):
        tick += 1
        for row in replay.tenants:
            stats = row["stats"]
            stats["rps_10s"] = round(1 + (tick * 7 + len(row["name"])) % 13 / 3, 2)
            stats["tps_10s"] = round(stats["rps_10s"] * 41.5, 1)
            stats["requests"] = (stats.get("requests") or 0) + tick
            history = stats["history"]
            history["rps"] = [*history["rps"], stats["rps_10s"]][-60:]
            history["tps"] = [*history["tps"], stats["tps_10s"]][-60:]


def measure(socket: Path, seconds: float, interval_s: float) -> tuple[float, float, int]:
    """(CPU seconds during warm-up, % of one core after it, bytes written to the terminal after it)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    env = os.environ | {"TERM": "xterm-256color", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
    argv = [sys.executable, "-m", "appliance", "tui", "--socket", str(socket)]
    argv += ["--interval", f"{interval_s:g}"]
    child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    written = [0]

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            written[0] += len(chunk)

    threading.Thread(target=drain, daemon=True).start()
    try:
        time.sleep(WARMUP_S)
        if child.poll() is not None:
            raise SystemExit(f"the TUI exited with {child.returncode} during the warm-up")
        start_cpu, start_bytes, start = cpu_seconds(child.pid), written[0], time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(child.pid) - start_cpu
        elapsed = time.monotonic() - start
        return start_cpu, 100 * used / elapsed, written[0] - start_bytes
    finally:
        child.terminate()
        child.wait(10)
        os.close(master)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--interval", type=float, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        socket = Path(directory) / "admin.sock"
        for label in ("still", "moving"):
            replay = AdminReplay(socket).start()
            stop = threading.Event()
            if label == "moving":
                threading.Thread(target=keep_moving, args=(replay, args.interval, stop), daemon=True).start()
            try:
                startup, percent, written = measure(socket, args.seconds, args.interval)
            finally:
                stop.set()
                replay.stop()
            print(
                f"{label:>6}: {percent:5.2f}% of one core over {args.seconds:g} s at {args.interval:g} s "
                f"refresh ({startup:.2f} CPU s to start; "
                f"{written / args.seconds / 1024:.1f} KiB/s to the terminal)",
                flush=True,
            )


if __name__ == "__main__":
    main()
