"""`GET /admin/stream`: server-sent events of stats ticks and of events as they happen.

Events are rows of the store's `events` table, written by the daemon and by CLI processes alike
(`lorabox key revoke` runs in its own process). One `EventFeed` reads the rows newer than the last
one it saw, every `poll_s` and only while some stream is open, and hands each to every open
stream: one small indexed query whatever the number of dashboards.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from ..tenancy.store import Store
from .errors import bad_request
from .overview import OVERVIEW

log = logging.getLogger(__name__)

INTERVAL_S = (0.5, 60.0)
DEFAULT_INTERVAL_S = 2.0
QUEUED_EVENTS = 1000
"""Events kept for one stream that does not read; past it the oldest go (it can refetch them)."""


class EventFeed:
    def __init__(self, store: Store, poll_s: float = 0.5) -> None:
        self.store, self.poll_s = store, poll_s
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._last_id = 0

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        if self._task is None:
            latest = self.store.events(1)
            self._last_id = latest[0]["id"] if latest else 0
            self._task = asyncio.create_task(self._poll(), name="admin event feed")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUED_EVENTS)
        self._queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.discard(queue)
        if not self._queues and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                fresh = self.store.events_after(self._last_id)
            except Exception:  # a locked or busy database: the next poll catches up
                log.warning("could not read new events", exc_info=True)
                continue
            for event in fresh:
                self._last_id = event["id"]
                for queue in self._queues:
                    if queue.full():
                        queue.get_nowait()
                    queue.put_nowait(event)


FEED = web.AppKey("event_feed", EventFeed)


def _interval(request: web.Request) -> float:
    raw = request.query.get("interval", str(DEFAULT_INTERVAL_S))
    try:
        interval = float(raw)
    except ValueError:
        interval = float("nan")
    if not INTERVAL_S[0] <= interval <= INTERVAL_S[1]:
        raise bad_request(f"interval must be {INTERVAL_S[0]:g} to {INTERVAL_S[1]:g} seconds", "interval")
    return interval


async def stream(request: web.Request) -> web.StreamResponse:
    interval = _interval(request)
    overview, feed = request.app[OVERVIEW], request.app[FEED]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()

    async def send(kind: str, data: Any) -> None:
        await response.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

    queue = feed.subscribe()
    try:
        while True:
            await send("stats", {"status": await overview.status(), "tenants": overview.tenants()})
            deadline = loop.time() + interval
            while (left := deadline - loop.time()) > 0:
                try:
                    event = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                await send("event", event)
    except ConnectionResetError:
        pass  # the dashboard went away
    finally:
        feed.unsubscribe(queue)
    return response
