"""Hostile clients and the probes that check everyone else is still served meanwhile."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from appliance.testing.loadclock import LoadClock

CHAT = "/v1/chat/completions"
PROBE_DEADLINE_S = 0.5
PROBE_TENANT = "globex"
T = TypeVar("T")


def assert_openai_error(body: Any, param: str | None = None) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


async def served_meanwhile(server: Any, hostile: Awaitable[T]) -> T:
    """Awaits `hostile` while /healthz and another tenant's chat request are sent over and over,
    each on a new connection; fails unless every one was answered, correctly, within 0.5 s: of
    the time the box's threads and this one were not kept waiting for a CPU (LoadClock), so that a
    machine busy with other work does not fail it."""
    task = asyncio.ensure_future(hostile)
    clock = LoadClock([server.local.process.pid])
    # Seconds each answer took: (on the LoadClock, of wall time)
    latencies: dict[str, list[tuple[float, float]]] = {"healthz": [], "another tenant": []}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def healthz() -> None:
            async with session.get(server.url + "/healthz") as response:
                assert response.status == 200

        async def another_tenant() -> None:
            body = {"model": PROBE_TENANT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
            headers = {"Authorization": f"Bearer {server.demo.keys[PROBE_TENANT]}"}
            async with session.post(server.url + CHAT, json=body, headers=headers) as response:
                assert response.status == 200, await response.text()

        async def probe(name: str, call: Callable[[], Awaitable[None]]) -> None:
            while True:
                began = clock.elapsed_s(), time.monotonic()
                await call()
                latencies[name].append((clock.elapsed_s() - began[0], time.monotonic() - began[1]))
                if task.done():
                    return
                await asyncio.sleep(0.1)

        await asyncio.gather(probe("healthz", healthz), probe("another tenant", another_tenant), task)
    for name, times in latencies.items():
        worst = max(times)
        assert worst[0] <= PROBE_DEADLINE_S, (
            f"{name} answered in {worst[0]:.2f} s ({worst[1]:.2f} s of wall time; all: {times})"
        )
    return task.result()


async def repeatedly(send: Callable[[], Awaitable[T]], seconds: float = 1.0) -> list[T]:
    """`send()` again and again for `seconds` (at least once): the probes get to overlap it."""
    results = [await send()]
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        results.append(await send())
    return results


async def raw_exchange(url: str, request: bytes, timeout_s: float = 20) -> tuple[int, Any]:
    """Send raw bytes on a new connection; (status, JSON body) of the response."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), timeout_s)
        return int(head.split(b" ", 2)[1]), json.loads(body)
    finally:
        writer.close()
