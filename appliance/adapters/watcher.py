"""Watch the drop folder and tell the server which tenant changed, once that tenant has settled.

Adapters arrive by copy (scp, rsync, a mounted share), so a single drop is hundreds of events
spread over seconds, and a half-written `adapter_model.safetensors` must never be inspected.
Hence, per tenant:

* **debounce**: act only after the tenant has had no events for `quiet_s`;
* **stability**: then compare two snapshots (path, size, mtime) taken `poll_s` apart, which also
  catches writes that raise no event here (another mount, a hard link written elsewhere);
* **one call at a time**: events that arrive while `on_change` runs cause one more call after it.

watchdog delivers events on its own thread. They cross to the event loop as tenant names,
coalesced: a burst of events (10,000 new folders are 30,000 of them) is one callback on the loop
with one entry per tenant, not one callback per event, so the loop never spends a burst's length
on it. Apart from that hand-over all state below is touched by the loop alone. Copies in progress
(`.v2.partial`, `.tmp`, dot names; see names.py) raise nothing until they are renamed into place.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_MOVED,
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from ..names import is_ignored_name
from .pacing import Pacer

log = logging.getLogger(__name__)

# Changes only. Reads (opened, closed without writing) are left out in the kernel already: the
# server's own inspection and snapshots read every folder, and with those events every on_change
# would trigger the next one, and a walk over 10,000 folders (watchdog walks them itself when its
# queue overflows) would be 40,000 events, overflow the queue again, and so on for ever.
CHANGE_EVENTS: list[type[FileSystemEvent]] = [
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
]

Snapshot = frozenset[tuple[str, int, int]]
HAND_OVER_BATCH = 256


class _Handler(FileSystemEventHandler):
    def __init__(self, callback: Callable[[FileSystemEvent], None]) -> None:
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._callback(event)


def snapshot(tenant_dir: Path) -> Snapshot:
    """(relative path, size, mtime_ns) of a tenant's versions and their files, copies in progress
    left out: what inspection reads (deeper levels are never read, so never waited for).

    Links are recorded, never followed. A folder that is gone gives the empty snapshot. Its cost
    grows with the folder: run it off the event loop (it is paced, see pacing.py).
    """
    found: set[tuple[str, int, int]] = set()
    pending = [(tenant_dir, 0)]
    pace = Pacer()
    while pending:
        pace()
        folder, depth = pending.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if depth == 0 and is_ignored_name(entry.name):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                    found.add((os.path.relpath(entry.path, tenant_dir), stat.st_size, stat.st_mtime_ns))
                    if depth == 0 and entry.is_dir(follow_symlinks=False):
                        pending.append((Path(entry.path), depth + 1))
        except OSError:  # vanished, replaced or unreadable mid-walk: the next snapshot will differ
            continue
    return frozenset(found)


class DropWatcher:
    """Calls `await on_change(tenant)` when `<adapters_dir>/<tenant>/` has changed and settled."""

    def __init__(
        self,
        adapters_dir: Path,
        on_change: Callable[[str], Awaitable[None]],
        *,
        quiet_s: float = 0.2,
        poll_s: float = 0.1,
    ) -> None:
        self.adapters_dir = adapters_dir.absolute()  # event paths are absolute; links stay unresolved
        self._on_change = on_change
        self._quiet_s = quiet_s
        self._poll_s = poll_s
        self._dirty: set[str] = set()
        self._last_event: dict[str, float] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._observer: BaseObserver | None = None
        self._arrived: set[str] = set()  # tenants with events not yet handed to the loop
        self._arrived_lock = threading.Lock()

    def dirty_tenants(self) -> set[str]:
        """Tenants with changes not yet handed to on_change."""
        return set(self._dirty)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(
            _Handler(self._on_event), str(self.adapters_dir), recursive=True, event_filter=CHANGE_EVENTS
        )
        await asyncio.to_thread(self._observer.start)  # it adds a watch per folder: thousands, maybe

    async def stop(self) -> None:
        """Stop the observer thread, then cancel pending and running work for every tenant."""
        observer, self._observer = self._observer, None
        if observer is not None:

            def halt() -> None:  # it removes a watch per folder, thousands of them: off the loop
                observer.stop()
                observer.join()

            await asyncio.to_thread(halt)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._dirty.clear()

    async def run(self) -> AsyncIterator[None]:
        """For aiohttp: `app.cleanup_ctx.append(lambda app: watcher.run())`."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    def _on_event(self, event: FileSystemEvent) -> None:
        """On watchdog's thread: find the tenants concerned and pass them to the loop."""
        moved = event.event_type == EVENT_TYPE_MOVED
        paths = (event.src_path, event.dest_path) if moved else (event.src_path,)
        echo = isinstance(event, DirModifiedEvent)
        tenants = {self._tenant_of(os.fsdecode(path), echo=echo) for path in paths} - {None}
        if not tenants or self._loop is None:
            return
        with self._arrived_lock:
            first = not self._arrived  # else a hand-over is already on its way to the loop
            self._arrived.update(tenants)  # type: ignore[arg-type]
        if first:
            try:
                self._loop.call_soon_threadsafe(self._hand_over)
            except RuntimeError:  # the loop closed under a late event
                return

    def _hand_over(self) -> None:
        """On the loop: a bounded batch of tenants per callback (10,000 new tenant folders are
        10,000 tasks to create), the rest in the next one."""
        with self._arrived_lock:
            batch = set(itertools.islice(self._arrived, HAND_OVER_BATCH))
            self._arrived -= batch
            more = bool(self._arrived)
        for tenant in batch:
            self._mark(tenant)
        if more and self._loop is not None:
            self._loop.call_soon(self._hand_over)

    def _tenant_of(self, path: str, *, echo: bool) -> str | None:
        # Plain string work: this runs for every event, 20,000 for a drop of 10,000 folders.
        prefix = os.path.join(self.adapters_dir, "")
        if not path.startswith(prefix):  # an empty or outside path: half of a move across the boundary
            return None
        parts = [part for part in path[len(prefix) :].split(os.sep) if part]
        if not parts or is_ignored_name(parts[0]):
            return None
        # "Modified" on the tenant folder is watchdog echoing a change to one of its entries; that
        # entry's own event decides (so creating `.v2.partial/` alone wakes nobody).
        if len(parts) == 1 and echo:
            return None
        if len(parts) > 1 and is_ignored_name(parts[1]):
            return None
        return parts[0]

    def _mark(self, tenant: str) -> None:
        if self._observer is None:  # stopped: a late event
            return
        assert self._loop is not None
        self._dirty.add(tenant)
        self._last_event[tenant] = self._loop.time()
        if tenant not in self._workers:
            self._workers[tenant] = self._loop.create_task(self._serve(tenant), name=f"watch {tenant}")

    async def _serve(self, tenant: str) -> None:
        """The one task per tenant: it is what keeps calls for a tenant from overlapping."""
        try:
            while tenant in self._dirty:
                await self._settle(tenant)
                self._dirty.discard(tenant)
                try:
                    await self._on_change(tenant)
                except Exception:
                    log.exception("handling a change to adapters of tenant %r failed", tenant)
        finally:
            del self._workers[tenant]
            self._last_event.pop(tenant, None)

    async def _settle(self, tenant: str) -> None:
        """Return once the tenant had no events for quiet_s and its files held still for poll_s."""
        loop = asyncio.get_running_loop()
        folder = self.adapters_dir / tenant
        while True:
            quiet_for = loop.time() - self._last_event[tenant]
            if quiet_for < self._quiet_s:
                await asyncio.sleep(self._quiet_s - quiet_for)
                continue
            marker = self._last_event[tenant]
            before = await asyncio.to_thread(snapshot, folder)
            await asyncio.sleep(self._poll_s)
            if await asyncio.to_thread(snapshot, folder) != before:
                self._last_event[tenant] = loop.time()
            elif self._last_event[tenant] == marker:
                return
