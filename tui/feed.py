"""The TUI's line to the daemon: the live stream, polling where there is none, reconnecting with backoff.

`Feed.run` is the body of one async worker on the app's event loop (network I/O only, nothing
blocks). It never raises: every failure becomes a `FeedState("down", reason)` for the banner,
then a new attempt after a backoff delay. What it learns arrives at the app as messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from textual.message import Message

from appliance.api.adminclient import AdminClient, AdminError, AdminUnavailable

from . import payload
from .payload import Event, Status, Tenant

log = logging.getLogger(__name__)

# How many events to fetch at (re)connection, to fill what was missed while away.
BACKFILL_EVENTS = 100
# Status codes that mean "this daemon has no /admin/stream": poll the plain endpoints instead.
NO_STREAM = (404, 405)


class FeedSnapshot(Message):
    def __init__(self, status: Status, tenants: list[Tenant]) -> None:
        super().__init__()
        self.status = status
        self.tenants = tenants


class FeedEvents(Message):
    def __init__(self, events: list[Event]) -> None:
        super().__init__()
        self.events = events


class FeedState(Message):
    """Where the connection stands: connecting, live (the stream), polling, or down."""

    def __init__(self, state: str, reason: str = "", retry_in_s: float | None = None, attempt: int = 0):
        super().__init__()
        self.state = state
        self.reason = reason
        self.retry_in_s = retry_in_s
        self.attempt = attempt


@dataclass(frozen=True)
class Backoff:
    first_s: float = 0.5
    cap_s: float = 10.0

    def delay(self, attempt: int) -> float:
        return min(self.cap_s, self.first_s * 2 ** max(attempt - 1, 0))


class Feed:
    def __init__(self, client: AdminClient, post: Callable[[Message], object], backoff: Backoff):
        self.client = client
        self.post = post
        self.backoff = backoff
        self._seen_ids: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._daemon: tuple[int | None, float | None] | None = None  # (pid, uptime) last seen
        self._delivered = False

    async def run(self, interval_s: float) -> None:
        attempt = 0
        while True:
            self._delivered = False
            try:
                await self._connect(interval_s)
                reason = "the daemon closed the connection"
            except (AdminUnavailable, AdminError) as exc:
                reason = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the UI must outlive any surprise from the socket
                log.exception("admin feed failed")
                reason = f"unexpected {type(exc).__name__}: {exc}"
            attempt = 1 if self._delivered else attempt + 1
            delay = self.backoff.delay(attempt)
            self.post(FeedState("down", reason, delay, attempt))
            await asyncio.sleep(delay)

    async def _connect(self, interval_s: float) -> None:
        try:
            await self._stream(interval_s)
        except AdminError as exc:
            if exc.status not in NO_STREAM:
                raise
            await self._poll(interval_s)

    async def _stream(self, interval_s: float) -> None:
        idle_timeout_s = max(10.0, 3 * interval_s)
        stream = self.client.stream(f"/admin/stream?interval={interval_s:g}", idle_timeout_s)
        async for sse in stream:
            if sse.event == "stats":
                data = payload.obj(sse.json())
                if not self._delivered:
                    self.post(FeedState("live"))
                    await self._backfill()
                self._deliver(Status.read(data.get("status")), payload.tenants(data))
            elif sse.event == "event" and (event := Event.read(sse.json())) is not None:
                self._post_events([event])

    async def _poll(self, interval_s: float) -> None:
        """For a daemon without /admin/stream: the same picture from the plain endpoints."""
        while True:
            status = await self.client.request("GET", "/admin/status")
            rows = await self.client.request("GET", "/admin/tenants")
            if not self._delivered:
                self.post(FeedState("polling", "this daemon has no /admin/stream"))
            self._deliver(Status.read(status), payload.tenants(rows))
            await self._backfill()
            await asyncio.sleep(interval_s)

    async def _backfill(self) -> None:
        try:
            recent = await self.client.request("GET", f"/admin/events?limit={BACKFILL_EVENTS}")
        except AdminError as exc:
            if exc.status != 404:
                raise
            return
        self._post_events(payload.events(recent))

    def _deliver(self, status: Status, tenants: list[Tenant]) -> None:
        self._note_restart(status)
        self._delivered = True
        self.post(FeedSnapshot(status, tenants))

    def _note_restart(self, status: Status) -> None:
        previous, self._daemon = self._daemon, (status.pid, status.uptime_s)
        if previous is None:
            return
        (old_pid, old_uptime), (pid, uptime) = previous, self._daemon
        restarted = (old_pid is not None and pid is not None and pid != old_pid) or (
            old_uptime is not None and uptime is not None and uptime < old_uptime
        )
        if restarted:
            detail = f"pid {old_pid} → {pid}" if pid != old_pid else "uptime went back"
            now = datetime.now(UTC).isoformat(timespec="seconds")
            self.post(FeedEvents([Event(None, now, "daemon_restarted", None, None, detail)]))

    def _post_events(self, events: Iterable[Event]) -> None:
        fresh = []
        for event in events:
            if event.id is not None:
                if event.id in self._seen_ids:
                    continue
                self._seen_ids.add(event.id)
                self._seen_order.append(event.id)
                if len(self._seen_order) > 10 * BACKFILL_EVENTS:
                    self._seen_ids.discard(self._seen_order.popleft())
            fresh.append(event)
        if fresh:
            self.post(FeedEvents(fresh))
