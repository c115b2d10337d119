"""The usage ledger: one row per request, buffered in memory and written in batches.

A `RequestRecord` is what one generation request leaves behind: the ledger books the admitted
ones (the billing record) and telemetry counts them all. It never holds prompt or completion text.

The writes happen on one writer thread with its own SQLite connection: a commit waits for the
disk (fsync), and the event loop that streams every tenant's tokens must never wait with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .store import Store

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RequestRecord:
    """One generation request that got past authentication, as it ended."""

    tenant: str
    key_id: str
    model: str
    """What the client asked for (`acme`, `acme@v2`, the base model's name)."""
    adapter_version: str
    """The version that served it; "" for the base model, or when `model` did not resolve."""
    endpoint: str  # "chat" | "completions"
    engine: str
    status: int
    """The HTTP status the client got; 499 when it hung up first (nginx's code)."""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens really generated, also for cut and abandoned streams."""
    ttft_ms: float | None = None
    """Time from the request's arrival to its first generated token."""
    latency_ms: float = 0.0
    admitted: bool = True
    """It reached generation (the ledger books only these; refusals before it are counted by
    telemetry alone, so that a flood of refused requests cannot grow the ledger)."""
    ts: str = field(default_factory=_now)

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["admitted"]
        return row


class UsageLedger:
    def __init__(self, database: Path, flush_every_s: float = 1.0):
        self.database = database
        self.flush_every_s = flush_every_s
        self._rows: list[dict[str, Any]] = []
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage")
        self._store: Store | None = None  # opened and used on the writer thread only

    def record(self, record: RequestRecord) -> None:
        if record.admitted:
            self._rows.append(record.row())

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
