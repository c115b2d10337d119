"""Talking to systemd (Type=notify): readiness, more time while starting, the watchdog, stopping.

No library: the protocol is one datagram per message on the AF_UNIX socket named by $NOTIFY_SOCKET
(a path, or an abstract name written with a leading "@"). Outside systemd every call is a no-op.

- Start-up: the unit's TimeoutStartSec only has to cover the seconds until the daemon first
  speaks. From then on `StartupExtender` asks for EXTEND_BY_S more every EXTEND_EVERY_S while the
  daemon downloads, loads and warms the model, up to `start_timeout_s`; READY=1 ends it.
- Watchdog (WatchdogSec= in the unit; systemd passes it on as $WATCHDOG_USEC and arms it at
  READY=1): `Watchdog` sends WATCHDOG=1 every half period, but only while the engine answers its
  health probes (engines/health.py): while one was answered within `engine_probe_timeout_s`.
  Probes go every `engine_probe_interval_s` (shorter, config.py checks), so a working engine
  never goes that long unanswered, and a hung one stops the pings one probe interval before
  lorabox's own probe timeout fires (which ends every request with an error, books it and exits
  1). systemd then restarts the service if lorabox's own exit does not come, or if the event
  loop no longer turns at all; the unit's WatchdogSec leaves lorabox's gentler exit time to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

from ..engines.health import HealthSnapshot

log = logging.getLogger(__name__)

EXTEND_EVERY_S = 10.0
EXTEND_BY_S = 30.0
"""Each EXTEND_TIMEOUT_USEC message gives this much from now: three messages' worth of slack."""


def sd_notify(state: str) -> bool:
    """Send `state` (newline-separated KEY=VALUE lines) to systemd; False outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
            return False
    return True


SYSLOG_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def writes_to_journal(env: Mapping[str, str] = os.environ) -> bool:
    """True when stderr is systemd's journal stream ($JOURNAL_STREAM names its device and inode)."""
    try:
        device, inode = (int(part) for part in env.get("JOURNAL_STREAM", "").split(":"))
        info = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


class JournalPriority(logging.Formatter):
    """Begins each record with its syslog priority ("<4>" for a warning), which journald reads as
    the line's priority (SyslogLevelPrefix=, on by default): `journalctl -p warning` then shows
    lorabox's warnings and errors, not every line at "info"."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITIES.get(record.levelno, 2 if record.levelno > logging.ERROR else 6)
        return f"<{priority}>{super().format(record)}"


def watchdog_period_s(env: Mapping[str, str] = os.environ) -> float | None:
    """systemd's watchdog period for this process (WatchdogSec=), or None when there is none."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        period = int(usec) / 1e6
    except ValueError:
        return None
    return period if period > 0 else None


def engine_answers(health: HealthSnapshot) -> bool:
    """True while the engine answered a probe within the probe timeout (and has not failed)."""
    return (
        health.failure is None
        and health.last_ok_s_ago is not None
        and health.last_ok_s_ago < health.probe_timeout_s
    )


class StartupExtender:
    """While start-up runs, asks systemd for EXTEND_BY_S more every EXTEND_EVERY_S, up to a limit.

    A thread, not a task: the slowest parts of start-up (importing the engine, reading weights)
    happen before or beside the event loop."""

    def __init__(self, limit_s: float, *, every_s: float = EXTEND_EVERY_S, by_s: float = EXTEND_BY_S):
        self.limit_s, self.every_s, self.by_s = limit_s, every_s, by_s
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StartupExtender:
        if os.environ.get("NOTIFY_SOCKET"):
            self._thread = threading.Thread(target=self._run, name="systemd start-up", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while time.monotonic() < deadline:
            by = min(self.by_s, deadline - time.monotonic())
            sd_notify(f"EXTEND_TIMEOUT_USEC={int(by * 1e6)}")
            if self._done.wait(self.every_s):
                return
        log.error("start-up still running after start_timeout_s (%g s): systemd will stop it", self.limit_s)


class Watchdog:
    """WATCHDOG=1 every half watchdog period, while `alive()` says the engine answers."""

    def __init__(self, period_s: float | None, alive: Callable[[], bool]):
        self.interval_s = None if period_s is None else period_s / 2
        self.alive = alive
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_health(cls, snapshot: Callable[[], HealthSnapshot]) -> Watchdog:
        """The watchdog systemd asked for ($WATCHDOG_USEC; none: a no-op), fed by engine health."""
        period = watchdog_period_s() if os.environ.get("NOTIFY_SOCKET") else None
        return cls(period, lambda: engine_answers(snapshot()))

    def start(self) -> None:
        if self.interval_s is not None:
            self._task = asyncio.create_task(self._run(self.interval_s), name="systemd watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, interval_s: float) -> None:
        silent = False
        while True:
            if self.alive():
                sd_notify("WATCHDOG=1")
                silent = False
            elif not silent:
                log.error("the engine stopped answering its health probes: no more watchdog pings")
                silent = True
            await asyncio.sleep(interval_s)
