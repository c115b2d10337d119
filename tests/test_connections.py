"""Slow and numerous connections: read deadlines and the connection cap (appliance/api/connections.py).

The first tests run the guard on a small in-process aiohttp app with short deadlines, to pin each
rule down; the last ones show the live daemon shrugging off slow senders and a connection flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from appliance.api.body import read_json
from appliance.api.connections import ConnectionCounters, ConnectionLimits, GuardedAppRunner
from appliance.api.errors import MAX_BODY_BYTES, APIError, openai_errors
from appliance.testing.loadclock import LoadClock
from tests.conftest import SERVER_SETTINGS, admin_status, no_loop_stall
from tests.probing import assert_openai_error, served_meanwhile

TRICKLE_S = 0.2  # a hostile client's pause between bytes
MARGIN_S = 2.0  # how late the server may close a slow connection, of its time not spent waiting for a CPU


@dataclass
class Guarded:
    host: str
    port: int
    counters: ConnectionCounters
    release: asyncio.Event  # lets the requests held by /hold finish


@asynccontextmanager
async def guarded_app(
    header_s: float = 0.3, body_s: float = 0.3, max_connections: int = 100
) -> AsyncIterator[Guarded]:
    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(await read_json(request))

    async def refuse(request: web.Request) -> web.Response:
        raise APIError(401, "no key")  # without reading the body, as an unauthenticated request

    async def hold(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"held": True})

    app = web.Application(middlewares=[openai_errors])
    app[MAX_BODY_BYTES] = 1 << 20
    app.router.add_get("/ok", ok)
    app.router.add_post("/echo", echo)
    app.router.add_post("/refuse", refuse)
    app.router.add_get("/hold", hold)
    counters = ConnectionCounters()
    runner = GuardedAppRunner(app, ConnectionLimits(header_s, body_s, max_connections), counters)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Guarded("127.0.0.1", site.port, counters, release)
    finally:
        release.set()
        await runner.cleanup()


@dataclass
class Reply:
    status: int
    body: object


def parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    return Reply(int(head.split(b" ", 2)[1]), json.loads(body) if body else None)


async def read_reply(reader: asyncio.StreamReader, timeout_s: float = 5) -> Reply:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = next(
        int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
    )
    return parse_reply(head + await asyncio.wait_for(reader.readexactly(length), timeout_s))


async def closed_after(reader: asyncio.StreamReader, timeout_s: float = 5) -> bytes:
    """Everything the server still sends, until it closes the connection."""
    return await asyncio.wait_for(reader.read(), timeout_s)


def assert_closed_at(clock: LoadClock, deadline_s: float) -> None:
    """Closed at the deadline: not before it (wall time, which load only lengthens), nor more than
    MARGIN_S after it (of the time this process was not kept waiting for a CPU)."""
    assert time.monotonic() - clock.began >= deadline_s - 0.05
    assert clock.elapsed_s() < deadline_s + MARGIN_S


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


def post_head(path: str, length: int, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


# -- the rules, in process ----------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /ok HT"], ids=["silent", "half-a-request-line"])
async def test_a_head_not_in_by_the_deadline_gets_408_and_is_closed(sent: bytes) -> None:
    async with guarded_app(header_s=0.3) as app:
        reader, writer = await asyncio.open_connection(app.host, app.port)
        clock = LoadClock()
        writer.write(sent)
        reply = parse_reply(await closed_after(reader))
        assert_closed_at(clock, 0.3)
        assert reply.status == 408
        assert_openai_error(reply.body)
        assert app.counters.header_timeouts == 1
        writer.close()


async def test_a_kept_alive_connection_times_its_next_head_from_its_first_byte() -> None:
    async with guarded_app(header_s=0.3) as app:
        reader, writer = await asyncio.open_connection(app.host, app.port)
        writer.write(get("/ok"))
        assert (await read_reply(reader)).status == 200
        await asyncio.sleep(0.6)  # idle past the head deadline: idle is not slow
        writer.write(get("/ok"))
        assert (await read_reply(reader)).status == 200
        writer.write(b"GET /o")
        clock = LoadClock()
        assert parse_reply(await closed_after(reader)).status == 408
        assert_closed_at(clock, 0.3)
        writer.close()


async def test_a_body_not_in_by_the_deadline_gets_408_and_is_closed() -> None:
    async with guarded_app(body_s=0.3) as app:
        reader, writer = await asyncio.open_connection(app.host, app.port)
        writer.write(post_head("/echo", 100) + b'{"a": ')
        clock = LoadClock()
        reply = parse_reply(await closed_after(reader))
        assert_closed_at(clock, 0.3)
        assert reply.status == 408
        assert_openai_error(reply.body)
        assert app.counters.body_timeouts == 1
        writer.close()


async def test_a_body_answered_early_is_still_cut_off_at_its_deadline() -> None:
    """aiohttp reads (and drops) an unread body after the response, for up to 10 s; a trickled
    one is cut off at the body deadline instead."""
    async with guarded_app(body_s=0.3) as app:
        reader, writer = await asyncio.open_connection(app.host, app.port)
        writer.write(post_head("/refuse", 100) + b"x")
        clock = LoadClock()
        assert (await read_reply(reader)).status == 401
        for _ in range(5):
            writer.write(b"x")
            await asyncio.sleep(0.05)
        with contextlib.suppress(ConnectionResetError):  # closed while we still wrote: also closed
            assert await closed_after(reader) == b""
        assert clock.elapsed_s() < 0.3 + MARGIN_S
        writer.close()


async def test_a_body_in_time_is_served_and_the_connection_kept() -> None:
    async with guarded_app(body_s=0.5) as app:
        reader, writer = await asyncio.open_connection(app.host, app.port)
        writer.write(post_head("/echo", 8) + b'{"a"')
        await asyncio.sleep(0.2)
        writer.write(b": 1}")
        reply = await read_reply(reader)
        assert (reply.status, reply.body) == (200, {"a": 1})
        await asyncio.sleep(0.7)  # past both deadlines, idle
        writer.write(get("/ok"))
        assert (await read_reply(reader)).status == 200
        writer.close()


async def test_at_the_cap_the_connection_waiting_longest_on_its_client_is_closed() -> None:
    async with guarded_app(header_s=5, max_connections=3) as app:
        idle = await asyncio.open_connection(app.host, app.port)
        idle[1].write(get("/ok"))
        assert (await read_reply(idle[0])).status == 200
        slow = await asyncio.open_connection(app.host, app.port)
        slow[1].write(b"GET /o")
        busy = await asyncio.open_connection(app.host, app.port)
        busy[1].write(get("/hold"))
        await asyncio.sleep(0.1)
        first = await asyncio.open_connection(app.host, app.port)
        assert await closed_after(idle[0]) == b""  # idle since before the others connected
        second = await asyncio.open_connection(app.host, app.port)
        assert await closed_after(slow[0]) == b""
        for reader, writer in (first, second):
            writer.write(get("/ok"))
            assert (await read_reply(reader)).status == 200
        app.release.set()
        assert (await read_reply(busy[0])).status == 200  # a request being handled is never cut
        assert (app.counters.evicted, app.counters.refused, app.counters.open) == (2, 0, 3)
        for _, writer in (idle, slow, busy, first, second):
            writer.close()


async def test_at_the_cap_with_every_connection_busy_a_newcomer_gets_503() -> None:
    async with guarded_app(max_connections=2) as app:
        busy = [await asyncio.open_connection(app.host, app.port) for _ in range(2)]
        for _, writer in busy:
            writer.write(get("/hold"))
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(app.host, app.port)
        reply = parse_reply(await closed_after(reader))
        assert reply.status == 503
        assert_openai_error(reply.body)
        app.release.set()
        for held_reader, _ in busy:
            assert (await read_reply(held_reader)).status == 200
        assert app.counters.refused == 1
        for _, held_writer in [*busy, (reader, writer)]:
            held_writer.close()


@pytest.mark.parametrize(
    ("soft", "hard", "fitted", "soft_after"),
    [(300, 300, 44, 300), (300, 4096, 1024, 1280), (2048, 4096, 1024, 2048)],
    ids=["cannot-raise", "raised-to-fit", "fits"],
)
def test_the_connection_cap_fits_the_open_file_limit(
    soft: int, hard: int, fitted: int, soft_after: int
) -> None:
    """max_connections 1024 with 256 descriptors kept for the daemon's own files."""
    script = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from appliance.api.connections import fit_to_file_limit\n"
        "print(fit_to_file_limit(1024), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(fitted), str(soft_after)]


# -- the live daemon ----------------------------------------------------------------------------


async def trickle(url: str, at_once: bytes, slowly: bytes, clock: LoadClock) -> tuple[float, float, bytes]:
    """Send `at_once`, then `slowly` a byte at a time; (seconds from the end of `at_once` until
    the server closed the connection, in wall time and on `clock`; what it answered)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(at_once)
    began, free = time.monotonic(), clock.elapsed_s()
    received = bytearray()

    async def read_until_closed() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.extend(chunk)

    closed = asyncio.ensure_future(read_until_closed())
    for byte in slowly:
        if received or closed.done():  # answered: writing on would only earn a reset
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(TRICKLE_S)
    await asyncio.wait_for(closed, 60)
    writer.close()
    return time.monotonic() - began, clock.elapsed_s() - free, bytes(received)


def test_slow_senders_are_cut_off_while_others_are_served(server) -> None:
    """60 connections trickling their headers or their body a byte every 0.2 s are each answered
    408 and closed at their deadline; /healthz and other tenants are served throughout. Closed not
    before the deadline in wall time, nor more than MARGIN_S after it on a LoadClock of the daemon
    and this test (waits for a CPU left out)."""
    header_s, body_s = SERVER_SETTINGS["request_header_timeout_s"], SERVER_SETTINGS["request_body_timeout_s"]
    body = json.dumps({"model": "acme", "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = post_head(
        "/v1/chat/completions", len(body), f"Authorization: Bearer {server.demo.keys['acme']}\r\n"
    )
    before = admin_status(server.demo)["connections"]

    clock = LoadClock([server.local.process.pid])

    async def hostile() -> list[tuple[float, float, bytes]]:
        slow_heads = [trickle(server.url, b"", head, clock) for _ in range(30)]
        slow_bodies = [trickle(server.url, head, body, clock) for _ in range(30)]
        return await asyncio.gather(*slow_heads, *slow_bodies)

    with no_loop_stall(server.demo):
        results = asyncio.run(served_meanwhile(server, hostile()))
    for i, (seconds, free, data) in enumerate(results):
        deadline = header_s if i < 30 else body_s
        assert seconds >= deadline - 0.3, (i, seconds)
        assert free <= deadline + MARGIN_S, (i, seconds, free)
        reply = parse_reply(data)
        assert reply.status == 408
        assert_openai_error(reply.body)
    after = admin_status(server.demo)["connections"]
    assert after["header_timeouts"] - before["header_timeouts"] == 30
    assert after["body_timeouts"] - before["body_timeouts"] == 30


def test_a_connection_flood_keeps_the_daemon_answering(server) -> None:
    """32 connections more than the cap, each with half a request line: the longest-waiting make
    room for newcomers, so /healthz and other tenants are still served, and the daemon never holds
    more connections than its cap."""
    limit = SERVER_SETTINGS["max_connections"]
    before = admin_status(server.demo)["connections"]
    assert before["limit"] == limit
    host, port = server.url.removeprefix("http://").split(":")

    async def flood() -> list[bool]:
        connections = []
        for _ in range(limit + 32):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /heal")
            connections.append((reader, writer))
        # Until the daemon has taken in the last newcomers (a loaded machine is slower, not red).
        deadline = time.monotonic() + 60
        while (await admin_status_async(server))["connections"]["evicted"] < before["evicted"] + 32:
            assert time.monotonic() < deadline, "the daemon never made room for the newcomers"
            await asyncio.sleep(0.05)
        open_now = asyncio.create_task(admin_status_async(server))
        closed = await asyncio.gather(*(was_closed(reader) for reader, _ in connections))
        for _, writer in connections:
            writer.close()
        assert (await open_now)["connections"]["open"] <= limit
        return closed

    with no_loop_stall(server.demo):
        closed = asyncio.run(served_meanwhile(server, flood()))
    assert sum(closed) >= 32


async def was_closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection without a word (as it closes one to make room).

    A connection closed before the daemon read what the client sent is reset by the kernel (RST, not
    FIN): that is closed too."""
    try:
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def admin_status_async(server) -> dict:
    return await asyncio.to_thread(admin_status, server.demo)
