"""The usage ledger: one row per request, buffered in memory and written in batches.

A `RequestRecord` is what one generation request leaves behind: the ledger books the admitted
ones (the billing record) and telemetry counts them all. It never holds prompt or completion text.

The writes happen on one writer thread with its own SQLite connection: a commit waits for the
disk (fsync), and the event loop that streams every tenant's tokens must never wait with it; it
awaits the commit's future instead (`book`), so that a response's last byte leaves only once
its row is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config.settings import COMMIT_MODES
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
    price_in: float = 0.0
    price_out: float = 0.0
    """The tenant's prices when it was served, per million prompt / completion tokens."""
    admitted: bool = True
    """It passed admission (rate limits, quota, queue bounds). The ledger books only these, with
    the tokens the engine processed (none for one that never left the queue); refusals are
    counted by telemetry alone, so that a flood of refused requests cannot grow the ledger."""
    ts: str = field(default_factory=_now)

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["admitted"]
        return row


class UsageLedger:
    """Usage rows (and the events that go with them) written by one writer thread.

    `commit` decides when a request's row is safe, and what its response waits for:

    - "fsync": the row is committed and fsynced before the response's last byte (each group of
      rows one transaction and one fsync, for all the requests that ended while the previous
      group was being written). Nothing is lost even to a power cut; each response waits for the
      disk, which can take long when other programs write to it.
    - "commit": the row is committed (written to SQLite's WAL, in the OS's cache) before the last
      byte, and the WAL is fsynced every `flush_every_s`. A crash or kill -9 of the daemon loses
      nothing; a power cut or kernel crash at most the last `flush_every_s` of rows.
    - "async": rows are written every `flush_every_s`, after their responses; a crash of the
      daemon loses those not yet written.

    A failed write keeps its rows for the next one; the requests waiting on it are let go (and it
    is logged), so that a broken disk does not hold every answer.
    """

    def __init__(self, database: Path, *, commit: str = "commit", flush_every_s: float = 1.0):
        if commit not in COMMIT_MODES:
            raise ValueError(f"commit must be one of {COMMIT_MODES}")
        self.database = database
        self.commit = commit
        self.flush_every_s = flush_every_s
        self._rows: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._waiting: list[asyncio.Future[None]] = []
        self._writing: asyncio.Task[None] | None = None
        self._unsynced = False  # "commit": written since the WAL was last fsynced
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage-sync")
        self._store: Store | None = None  # opened and used on the writer thread only

    def book(self, record: RequestRecord) -> asyncio.Future[None]:
        """Book an admitted request's row; the future is done once it is committed (at once for a
        request that was not admitted, or in "async" mode)."""
        committed = asyncio.get_running_loop().create_future()
        if not record.admitted:
            committed.set_result(None)
            return committed
        self._rows.append(record.row())
        if self.commit == "async":
            committed.set_result(None)
        else:
            self._waiting.append(committed)
            self._start_writing()
        return committed

    def event(self, kind: str, *, tenant: str = "", version: str = "", detail: str = "") -> None:
        """An event the request path raises (a quota warning), written with the next rows."""
        self._events.append(
            {"ts": _now(), "kind": kind, "tenant": tenant, "version": version, "detail": detail}
        )
        self._start_writing()

    def _start_writing(self) -> None:
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._rows or self._events:
            rows, events, waiting = self._rows, self._events, self._waiting
            self._rows, self._events, self._waiting = [], [], []
            try:
                await asyncio.get_running_loop().run_in_executor(self._writer, self._write, rows, events)
            except Exception:
                log.exception(
                    "could not write %d usage rows; keeping them for the next write", len(rows) + len(events)
                )
                self._rows[:0], self._events[:0] = rows, events
                return
            else:
                self._unsynced = True
            finally:
                for future in waiting:
                    if not future.done():
                        future.set_result(None)

    def _write(self, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        if self._store is None:
            self._store = Store.connect(self.database)
            # In WAL mode NORMAL commits without an fsync; a commit is still atomic, and safe from
            # a crash of this process (the OS has the WAL). FULL fsyncs every commit.
            self._store.db.execute(f"PRAGMA synchronous = {'FULL' if self.commit == 'fsync' else 'NORMAL'}")
        with self._store.writing():
            self._store.record_usage(rows)
            if events:
                self._store.db.table("events").insert_all(events)

    def _close(self) -> None:
        if self._store is not None:
            self._store.db.close()
            self._store = None

    async def flush(self) -> None:
        """Write everything booked so far; returns once it is written (or the write failed)."""
        if self._writing is not None and not self._writing.done():
            await self._writing  # what it took, and what came meanwhile
        if self._rows or self._events:
            self._start_writing()
            assert self._writing is not None
            await self._writing

    async def sync(self) -> None:
        """ "commit" mode: fsync the WAL, on a thread of its own (the writer goes on meanwhile)."""
        if self.commit != "commit" or not self._unsynced:
            return
        self._unsynced = False
        await asyncio.get_running_loop().run_in_executor(self._syncer, _fsync, Path(f"{self.database}-wal"))

    async def run(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: write periodically (rows booked in "async" mode, and any a
        failed write kept), fsync the WAL in "commit" mode, and write and sync once more on shutdown."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.flush_every_s)
                await self.flush()
                await self.sync()

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # a write already on the writer thread finishes there, before the last one
        await self.flush()
        await self.sync()
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close)
        self._writer.shutdown()
        self._syncer.shutdown()


def _fsync(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # checkpointed and gone: its rows are in the database, synced
        return
    except OSError:
        log.exception("cannot open %s to sync it", path)
        return
    try:
        os.fsync(descriptor)
    except OSError:
        log.exception("cannot sync %s", path)
    finally:
        os.close(descriptor)
