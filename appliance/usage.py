"""The usage ledger: one row per request, buffered in memory and written in batches."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from .store import Store

log = logging.getLogger(__name__)


class UsageLedger:
    def __init__(self, store: Store, flush_every_s: float = 1.0):
        self.store = store
        self.flush_every_s = flush_every_s
        self._rows: list[dict[str, Any]] = []

    def record(self, **row: Any) -> None:
        self._rows.append({"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **row})

    def flush(self) -> None:
        rows, self._rows = self._rows, []
        try:
            self.store.record_usage(rows)
        except Exception:
            log.exception("could not write %d usage rows; keeping them for the next flush", len(rows))
            self._rows[:0] = rows

    async def run(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: flush periodically, and once more on shutdown."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.flush_every_s)
                self.flush()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        self.flush()
