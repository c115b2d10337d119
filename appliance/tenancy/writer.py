"""The daemon's writes to the state database, other than usage rows: on one thread, never the loop.

Operator actions (policies, keys, routes, the audit log) and the events of the adapter path are
written here, one at a time, on a thread with its own connection: a write that waits for the
disk, or for a lock another program holds (an operator's `sqlite3` session, a backup), holds
that thread and the one caller waiting for it, never the event loop every tenant's tokens go
through. The event loop's own connection only reads (`PRAGMA query_only`, set by the daemon).

A write waits at most WRITE_WAIT_S for a lock, then fails with StoreUnavailable (busy: retry),
which the admin API answers with 503 and Retry-After; a full or failing disk is a
StoreUnavailable too, saying so. Nothing is retried behind the caller's back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..errors import LoraboxError
from .store import Store, unavailable

log = logging.getLogger(__name__)

WRITE_WAIT_S = 1.0
"""How long a write waits for another connection's write lock: longer than any of the daemon's own
writes (the usage ledger's and the adapter registry's batches take milliseconds), short enough
for an operator's command to say "busy, retry" at once."""

T = TypeVar("T")


class StoreWriter:
    def __init__(self, database: Path, wait_s: float = WRITE_WAIT_S):
        self.database, self.wait_s = database, wait_s
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-store")
        self._store: Store | None = None  # opened and used on that thread only

    async def call(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`write(store, *args, **kwargs)` on the writer thread; StoreUnavailable if the database
        does not take it (StoreError and PolicyError pass through as they are)."""
        job = functools.partial(self._run, write, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._thread, job)

    def _run(self, write: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._store is None:
            self._store = Store.connect(self.database, busy_timeout_ms=int(self.wait_s * 1000))
        try:
            return write(self._store, *args, **kwargs)
        except sqlite3.Error as exc:
            if self._store.db.conn.in_transaction:  # a statement of sqlite_utils' that failed mid-way
                self._store.db.conn.rollback()
            raise unavailable(exc, self.database) from exc

    async def event(self, kind: str, *, tenant: str = "", version: str = "", detail: str = "") -> None:
        """Record an event of the adapter path. It says what happened, and has happened whether or
        not it is recorded: a database that does not take it is logged, not raised."""
        try:
            await self.call(Store.record_event, kind, tenant=tenant, version=version, detail=detail)
        except LoraboxError as exc:
            log.warning("event %s of %s not recorded: %s", kind, tenant or "the box", exc)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown()

    def _close(self) -> None:
        if self._store is not None:
            self._store.db.close()
            self._store = None
