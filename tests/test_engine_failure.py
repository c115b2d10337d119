"""The engine core dies or hangs: the daemon says so at once (/readyz 503 with the reason), ends
every request with an error, books each one as an error with the tokens it got, and exits
non-zero so that systemd restarts it. Each test kills its own dedicated server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.testing.loadclock import LoadClock, wait_within
from tests.conftest import Demo, Server, post_json
from tests.dedicated import StreamReader, engine_core, start_dedicated, usage_rows

MAX_TOKENS = 1000
# Greedy: each demo tenant then runs to the full 1000 tokens (no early end of text), far more than
# a stream produces before the engine is killed under it.
LONG = {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS, "temperature": 0}


@pytest.fixture
def dedicated(demo: Demo, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(**settings: float) -> Server:
        server = start_dedicated(demo, tmp_path, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.local.kill()  # whatever is left: the daemon, a stopped engine core, its worker


def readyz_once(server: Server) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def wait_for_unready(server: Server, clock: LoadClock, within_s: float) -> dict[str, Any]:
    """/readyz's body once it answers 503, within `within_s` of `clock` (wall time less what the
    machine's load kept the daemon, its engine and this test waiting: see LoadClock)."""

    def unready() -> dict[str, Any] | None:
        status, body = readyz_once(server)
        return dict(body) if status == 503 else None

    return wait_within(clock, within_s, unready, "/readyz answering 503")


def exit_status(server: Server, clock: LoadClock, within_s: float) -> int:
    """The daemon's exit status, once it has exited: by `within_s` of `clock` since it started."""
    exited = lambda: server.local.process.poll() is not None  # noqa: E731
    wait_within(clock, within_s - clock.elapsed_s(), exited, "the daemon exiting")
    return server.local.process.returncode


def long_stream(server: Server, tenant: str) -> StreamReader:
    stream = StreamReader(server, server.demo.keys[tenant], model=tenant, **LONG)
    stream.start()
    assert stream.first_text.wait(60), f"no text streamed: {stream.failure}"
    return stream


def assert_booked_as_cut(server: Server, stream: StreamReader, tenant: str) -> None:
    rows = [row for row in usage_rows(server.demo) if row["tenant"] == tenant]
    assert len(rows) == 1, rows
    assert rows[0]["status"] == 503
    sent = [text for text in stream.texts if text]
    assert len(sent) <= rows[0]["completion_tokens"] < MAX_TOKENS  # each event carried >= 1 token


def test_a_killed_engine_core_fails_the_daemon_at_once(dedicated):
    server = dedicated()
    stream = long_stream(server, "acme")
    engine_core(server).kill()
    clock = LoadClock([server.local.process.pid])

    body = wait_for_unready(server, clock, within_s=2)
    assert body["status"] == "failed"
    assert "engine core" in body["reason"]
    status, refused = post_json(
        f"{server.base_url}/completions",
        {"model": "globex", "prompt": "Hello", "max_tokens": 5},
        key=server.demo.keys["globex"],
    )
    assert status == 503
    assert refused["error"]["code"] == "engine_failed"
    assert refused["error"]["type"] == "service_unavailable"

    stream.join(60)  # returns as soon as the stream has ended
    assert stream.cut_with == "engine_failed", stream.events[-3:]
    assert exit_status(server, clock, within_s=10) != 0

    assert_booked_as_cut(server, stream, "acme")
    [row] = [row for row in usage_rows(server.demo) if row["tenant"] == "globex"]
    assert (row["status"], row["completion_tokens"]) == (503, 0)


def test_a_hung_engine_core_fails_the_daemon_within_the_probe_timeout(dedicated):
    server = dedicated(engine_probe_interval_s=0.5, engine_probe_timeout_s=3.0)
    stream = long_stream(server, "initech")
    engine_core(server).suspend()  # SIGSTOP: alive, but its loop no longer turns
    clock = LoadClock([server.local.process.pid])

    body = wait_for_unready(server, clock, within_s=0.5 + 3.0 + 2)  # a probe's interval and timeout, + margin
    assert body["status"] == "failed"
    assert "did not answer a health probe within 3 s" in body["reason"]

    stream.join(60)  # returns as soon as the stream has ended
    assert stream.cut_with == "engine_failed", stream.events[-3:]
    # Noticed, then a 2 s linger answering 503, then up to 5 s for the stopped core before it is killed.
    assert exit_status(server, clock, within_s=20) != 0
    assert_booked_as_cut(server, stream, "initech")
