"""The usage ledger: one row per request, buffered in memory and written in batches.

The writes happen on one writer thread with its own SQLite connection: a commit waits for the
disk (fsync), and the event loop that streams every tenant's tokens must never wait with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .store import Store

log = logging.getLogger(__name__)


class UsageLedger:
    def __init__(self, database: Path, flush_every_s: float = 1.0):
        self.database = database
        self.flush_every_s = flush_every_s
        self._rows: list[dict[str, Any]] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage")
        self._store: Store | None = None  # opened and used on the writer thread only

    def record(self, **row: Any) -> None:
        self._rows.append({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **row})

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self._store is None:
            self._store = Store.connect(self.database)
        self._store.record_usage(rows)

    def _close(self) -> None:
        if self._store is not None:
            self._store.db.close()
            self._store = None

    async def flush(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write, rows)
        except Exception:
            log.exception("could not write %d usage rows; keeping them for the next flush", len(rows))
            self._rows[:0] = rows

    async def run(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: flush periodically, and once more on shutdown."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.flush_every_s)
                await self.flush()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a write already on the writer thread finishes there, before the last one
        await self.flush()
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close)
        self._writer.shutdown()
