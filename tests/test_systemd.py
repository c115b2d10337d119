"""systemd's side, against a real AF_UNIX datagram socket: a real `lorabox serve` says READY=1
only once the engine serves, asks for time while it starts, pings the watchdog at the rate
systemd asks while its engine answers, and stops pinging when the engine hangs. The unit's
timers fit the daemon's own."""

from __future__ import annotations

import asyncio
import configparser
import itertools
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.config.settings import Settings
from appliance.daemon import FAILED_LINGER_S, HANDLER_SHUTDOWN_S
from appliance.demo.build import init_demo
from appliance.engines.health import EngineHealth, HealthSnapshot
from appliance.engines.vllm import STOP_TIMEOUT_S
from appliance.ops import systemd
from appliance.ops.systemd import EXTEND_BY_S, EXTEND_EVERY_S, engine_answers, sd_notify, watchdog_period_s
from appliance.testing.loadclock import LoadClock, wait_within
from appliance.testing.localserver import LocalServer, free_port, http_status
from tests.conftest import SERVER_START_TIMEOUT_S, Demo, Server
from tests.dedicated import engine_core

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "lorabox.service"


def unit_seconds(key: str) -> float:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(UNIT)
    return float(unit["Service"][key])


# The kernel's time of arrival on the socket (a struct timespec, CLOCK_REALTIME): when the daemon
# sent it, whenever the listener's thread got to read it. Not in Python's socket module; 35 on
# x86 and arm (asm-generic/socket.h).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


@dataclass
class Message:
    at: float  # when it arrived (the kernel's timestamp, Unix time)
    text: str
    readyz: int | None = None  # /readyz's status right after it arrived, where the test asked
    # The daemon's LoadClock on arrival: bounds on how late a message came are judged on it, so
    # that the time a loaded machine kept the daemon (and the listener) waiting for a CPU does not
    # count; lower bounds on wall time (`at`), which load can only lengthen.
    free: float = 0.0


class NotifyListener(threading.Thread):
    """systemd's end of $NOTIFY_SOCKET: keeps every datagram with its arrival time."""

    def __init__(self, path: Path, readyz_url: str | None = None):
        super().__init__(daemon=True)
        self.path, self.readyz_url = path, readyz_url
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.messages: list[Message] = []
        self.closed = threading.Event()
        self.clock: LoadClock | None = None

    def watch(self, pid: int) -> None:
        """Time messages on a LoadClock of the daemon `pid` (started before it can send any)."""
        self.clock = LoadClock([pid], client_tid=self.native_id)

    def run(self) -> None:
        while not self.closed.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            assert self.clock is not None, "a message before the daemon was watched"
            [(seconds, nanoseconds)] = [
                struct.unpack("qq", cdata)
                for level, kind, cdata in ancillary
                if (level, kind) == (socket.SOL_SOCKET, SO_TIMESTAMPNS)
            ]
            message = Message(seconds + nanoseconds / 1e9, data.decode(), free=self.clock.elapsed_s())
            # What a client sees at the moment systemd hears "more time" or "ready".
            if self.readyz_url and ("READY=1" in message.text or "EXTEND_TIMEOUT_USEC" in message.text):
                message.readyz = http_status(self.readyz_url)
            self.messages.append(message)

    def close(self) -> None:
        self.closed.set()
        self.join(2)
        self.sock.close()

    def having(self, fragment: str) -> list[Message]:
        return [m for m in list(self.messages) if fragment in m.text]

    def wait_for_count(self, fragment: str, count: int, timeout_s: float) -> None:
        """Until `count` messages have `fragment`, within `timeout_s` of the daemon's LoadClock."""
        assert self.clock is not None
        condition = lambda: len(self.having(fragment)) >= count  # noqa: E731
        wait_within(self.clock, timeout_s, condition, f"{count} messages {fragment!r}")

    def wait_for(self, fragment: str, timeout_s: float) -> Message:
        """The first message with `fragment`, within `timeout_s` of the daemon's LoadClock."""
        assert self.clock is not None
        found = wait_within(self.clock, timeout_s, lambda: self.having(fragment), f"{fragment!r}")
        return found[0]


# -- the function and the unit ---------------------------------------------------------------


def test_sd_notify_reaches_a_path_and_an_abstract_socket(tmp_path, monkeypatch):
    listener = NotifyListener(tmp_path / "notify.sock")
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"lorabox-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(listener.path))
        assert sd_notify("READY=1\nSTATUS=serving")
        assert listener.sock.recv(100) == b"READY=1\nSTATUS=serving"
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("WATCHDOG=1")
        assert abstract.recv(100) == b"WATCHDOG=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not sd_notify("WATCHDOG=1")  # outside systemd: nothing, and no error
    finally:
        listener.sock.close()
        abstract.close()


def test_watchdog_period_is_systemds_for_this_process_only():
    assert watchdog_period_s({"WATCHDOG_USEC": "40000000"}) == 40.0
    assert watchdog_period_s({"WATCHDOG_USEC": "40000000", "WATCHDOG_PID": str(os.getpid())}) == 40.0
    assert watchdog_period_s({"WATCHDOG_USEC": "40000000", "WATCHDOG_PID": "1"}) is None  # a parent's
    assert watchdog_period_s({}) is None
    assert watchdog_period_s({"WATCHDOG_USEC": "soon"}) is None


@pytest.mark.parametrize(
    ("failure", "last_ok_s_ago", "answers"),
    [(None, 0.5, True), (None, 19.9, True), (None, 20.0, False), (None, None, False), ("dead", 0.1, False)],
)
def test_the_engine_answers_while_a_probe_came_back_within_the_probe_timeout(failure, last_ok_s_ago, answers):
    assert engine_answers(HealthSnapshot(failure, last_ok_s_ago, 5.0, 20.0)) is answers


async def test_the_watchdog_is_fed_at_ready_before_the_first_probe_has_come_back(monkeypatch, caplog):
    """At READY=1 the engine has just started: the first ping goes at once, with no ERROR, even
    while the first health probe is still out (5 of 10 starts under systemd logged "no more
    watchdog pings" there, the pings then going on)."""
    sent: list[str] = []
    two_pings = asyncio.Event()

    def notify(state: str) -> bool:
        sent.append(state)
        if len(sent) == 2:
            two_pings.set()
        return True

    monkeypatch.setattr(systemd, "sd_notify", notify)

    class BusyEngine:  # alive, and slow to answer its first probe
        def failure(self) -> None:
            return None

        async def probe(self) -> None:
            await asyncio.sleep(60)

    health = EngineHealth(BusyEngine(), probe_every_s=5.0, probe_timeout_s=20.0)  # type: ignore[arg-type]
    health.start(lambda reason: None)
    watchdog = systemd.Watchdog(0.2, lambda: engine_answers(health.snapshot()))
    watchdog.start()
    try:
        await asyncio.wait_for(two_pings.wait(), 30)
    finally:
        await watchdog.stop()
        await health.stop()
    assert sent[:2] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_log_lines_carry_their_priority_into_the_journal():
    """journald reads a leading "<N>" as the line's priority: `journalctl -p warning` shows lorabox's
    warnings (a fallback to llama.cpp, say), which otherwise all arrive at "info"."""
    stderr = os.fstat(2)
    assert systemd.writes_to_journal({"JOURNAL_STREAM": f"{stderr.st_dev}:{stderr.st_ino}"})
    assert not systemd.writes_to_journal({"JOURNAL_STREAM": f"{stderr.st_dev}:{stderr.st_ino + 1}"})
    assert not systemd.writes_to_journal({})
    formatter = systemd.JournalPriority("%(levelname)s %(message)s")
    lines = [
        formatter.format(logging.LogRecord("x", level, __file__, 1, "m", None, None))
        for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    ]
    assert lines == ["<7>DEBUG m", "<6>INFO m", "<4>WARNING m", "<3>ERROR m", "<2>CRITICAL m"]


def test_the_watchdog_leaves_time_for_lorabox_own_exit_on_a_hung_engine():
    """Pings stop once no probe answered for the probe timeout; the last one came up to
    WatchdogSec/2 earlier. lorabox calls the engine hung one probe interval after the pings stop
    and exits within its linger, the connections' closing and the engine core's stop: all of that
    must come before systemd's SIGABRT, which writes nothing."""
    settings = Settings()
    watchdog_s = unit_seconds("WatchdogSec")
    own_exit_s = FAILED_LINGER_S + 2 * HANDLER_SHUTDOWN_S + STOP_TIMEOUT_S
    earliest_kill = settings.engine_probe_timeout_s + watchdog_s / 2
    own_exit_done = settings.engine_probe_timeout_s + settings.engine_probe_interval_s + own_exit_s
    assert earliest_kill >= own_exit_done + 3
    assert watchdog_s <= 60  # and a stuck daemon is still restarted within a minute


def test_start_timeout_only_covers_the_daemon_before_it_first_speaks():
    assert EXTEND_BY_S >= 2 * EXTEND_EVERY_S  # a late message never lets the timer run out
    assert unit_seconds("TimeoutStartSec") >= EXTEND_BY_S


# -- a real daemon ----------------------------------------------------------------------------

PROBE_EVERY_S, PROBE_TIMEOUT_S = 3.0, 6.0
WATCHDOG_S = 2.0  # systemd's WatchdogSec for this daemon: a ping every second


@pytest.fixture
def notified_server(demo: Demo, tmp_path: Path) -> Iterator[tuple[Server, NotifyListener]]:
    """`lorabox serve` on its own copy of the demo, started as systemd would with WatchdogSec=1."""
    shutil.copytree(demo.model_dir, tmp_path / "model")
    own = Demo(tmp_path, init_demo(tmp_path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    listener = NotifyListener(tmp_path / "notify.sock", readyz_url=f"{url}/readyz")
    listener.start()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LORABOX_")} | {
        "NOTIFY_SOCKET": str(listener.path),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
        "LORABOX_PORT": str(port),
        "LORABOX_METRICS_LISTEN": "",  # no second port to pick: nothing here reads the metrics
        "LORABOX_ENGINE_PROBE_INTERVAL_S": str(PROBE_EVERY_S),
        "LORABOX_ENGINE_PROBE_TIMEOUT_S": str(PROBE_TIMEOUT_S),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "serve", "--config", str(own.config)],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    listener.watch(process.pid)
    server = Server(LocalServer(url, process, log_path), own)
    try:
        yield server, listener
    finally:
        server.local.kill()
        listener.close()


def test_ready_extend_and_watchdog_follow_the_engine(notified_server):
    server, listener = notified_server
    ready = listener.wait_for("READY=1", SERVER_START_TIMEOUT_S)
    assert server.local.process.poll() is None, server.local.log_tail()

    # Starting: more time asked at once and then every EXTEND_EVERY_S, never while ready.
    extends = [m for m in listener.having("EXTEND_TIMEOUT_USEC") if m.at < ready.at]
    assert extends, listener.messages[:5]
    assert extends[0].text == f"EXTEND_TIMEOUT_USEC={int(EXTEND_BY_S * 1e6)}"
    assert all(m.readyz != 200 for m in extends), [(m.text, m.readyz) for m in extends]
    # Each message gives EXTEND_BY_S from its arrival: a later one must come within that, even on
    # a loaded machine where the thread waits for the GIL behind the engine's imports.
    gaps = [b.free - a.free for a, b in itertools.pairwise(extends)]
    assert all(gap < EXTEND_BY_S for gap in gaps), gaps
    # READY=1 only once the engine serves: /readyz answers 200 the moment systemd hears it.
    assert ready.readyz == 200, ready
    assert not [m for m in listener.having("WATCHDOG=1") if m.at < ready.at]

    # Serving: a ping every WATCHDOG_S / 2, never as much as WATCHDOG_S apart (systemd's limit).
    listener.wait_for_count("WATCHDOG=1", 7, timeout_s=30)
    pings = listener.having("WATCHDOG=1")
    gaps = [(b.at - a.at, b.free - a.free) for a, b in itertools.pairwise(pings)]  # (wall, LoadClock)
    assert all(wall >= 0.9 * WATCHDOG_S / 2 for wall, _ in gaps), gaps
    assert all(free < WATCHDOG_S for _, free in gaps), gaps

    # The engine hangs (SIGSTOP): the pings stop when no probe has answered for PROBE_TIMEOUT_S,
    # PROBE_EVERY_S before lorabox itself calls the engine hung (its probe, sent PROBE_EVERY_S
    # after the last answer, times out PROBE_TIMEOUT_S later).
    engine_core(server).suspend()
    assert listener.clock is not None
    stopped_at = listener.clock.elapsed_s()
    failed = listener.wait_for("STATUS=engine failed", PROBE_EVERY_S + PROBE_TIMEOUT_S + 10)
    assert server.local.process.wait(timeout=60) != 0
    last_ping = listener.having("WATCHDOG=1")[-1]
    assert last_ping.free - stopped_at <= PROBE_EVERY_S + PROBE_TIMEOUT_S + 1
    # Between the last ping and lorabox's own verdict, the event loop turned (lorabox was probing
    # and answering /readyz) but no ping went out: a ping from a live event loop alone would have.
    assert failed.at - last_ping.at >= 2.0, (failed.at - last_ping.at, listener.messages[-6:])
    assert "did not answer a health probe" in failed.text
