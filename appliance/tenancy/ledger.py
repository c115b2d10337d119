"""The usage ledger: one row per request, buffered in memory and written in batches.

A `RequestRecord` is what one generation request leaves behind: the ledger books the admitted
ones (the billing record) and telemetry counts them all. It never holds prompt or completion text.

The writes happen on one writer thread with its own SQLite connection: a commit waits for the
disk, and the event loop that streams every tenant's tokens must never wait with it; it awaits
the write's future instead (`book`), so that a response's last byte leaves only once its row is
durable. That connection never waits for a lock (busy timeout 0): a batch that SQLite cannot
take at once (another program holds the write lock, the disk is full, an I/O error) goes to the
spool instead (tenancy/spool.py), and is replayed into SQLite once it takes writes again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import background
from ..config.settings import COMMIT_MODES
from ..errors import LoraboxError, StoreError
from .spool import UsageSpool, fsync_path
from .store import Store, unavailable

log = logging.getLogger(__name__)

MAX_PENDING_ROWS = 10_000
"""Rows held in memory at most (booked, not yet durable). Past it a request's row is refused (its
response ends 503) and new requests wait for the ledger: see `UsageLedger`."""
MAX_PENDING_EVENTS = 1_000
UNBOOKED_STATUS = 503
"""The status a row gets when its response could not wait for it to be durable (and so ended
with 503 rather than its last bytes)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class LedgerUnavailable(LoraboxError):
    """Neither the database nor the spool can take usage rows now; the message says why and what
    to do. A response whose row this refuses must not be completed: the request was not billed."""


@dataclass(frozen=True)
class RequestRecord:
    """One generation request that got past authentication, as it ended."""

    tenant: str
    """The tenant it was served for (named by a service key, or the tenant key's own)."""
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
    key_kind: str = "tenant"
    """Which kind of key sent it: the tenant's own (`tenant`) or a service key (`service`)."""
    admitted: bool = True
    """It passed admission (rate limits, quota, queue bounds). The ledger books only these, with
    the tokens the engine processed (none for one that never left the queue); refusals are
    counted by telemetry alone, so that a flood of refused requests cannot grow the ledger."""
    tier: str = "default"
    """The band that served it: `default` (interactive) or `batch` (a batch job's line, at the
    tenant's batch prices)."""
    batch_id: str | None = None
    """The batch job a `batch` request was a line of."""
    guardrails: tuple[str, ...] = ()
    """Which of the tenant's guardrails acted (deny_input, deny_output, redact_output): counted by
    telemetry; the ledger keeps the status and finish reason they gave."""
    ts: str = field(default_factory=_now)

    def row(self) -> dict[str, Any]:
        row = asdict(self)
        del row["admitted"], row["guardrails"]
        return row


@dataclass(frozen=True)
class LedgerHealth:
    """The ledger now, for /readyz, the admin API, `lorabox status` and /metrics."""

    pending_rows: int
    """Booked and not yet durable: waiting for a write, being written, or kept after a failure."""
    spooled_rows: int
    """In the spool, not yet replayed into the database."""
    write_failures: dict[str, int]
    """Writes that failed since start, by target: "database" (replays included), "spool"."""
    dropped_rows: int
    """Rows refused because MAX_PENDING_ROWS were waiting (their responses ended 503)."""
    unavailable: str | None
    """Why new requests are refused (neither place takes rows), or None."""
    spool_dir: str


@dataclass
class _Pending:
    row: dict[str, Any]
    durable: asyncio.Future[None] | None
    """What the response waits for; None once nobody does (written "async", or already told)."""


class UsageLedger:
    """Usage rows (and the events that go with them) written by one writer thread.

    `commit` decides when a request's row is safe, and what its response waits for:

    - "fsync": the row is committed and fsynced (or appended to the spool and fsynced) before the
      response's last byte (each group of rows one transaction and one fsync, for all the requests
      that ended while the previous group was being written). Nothing is lost even to a power
      cut; each response waits for the disk, which can take long when other programs write to it.
    - "commit": the row is committed (written to SQLite's WAL, in the OS's cache) or appended to
      the spool before the last byte; both are fsynced every `flush_every_s`. A crash or kill -9
      of the daemon loses nothing; a power cut or kernel crash at most the last `flush_every_s`.
    - "async": rows are written every `flush_every_s`, after their responses; a crash of the
      daemon loses those not yet written.

    Which failure loses what: SQLite locked by another program, full or failing → the rows go to
    the spool, nothing is lost and nothing waits for the lock. The spool failing too (the same
    full disk) → the rows stay in memory, retried every `flush_every_s`; the responses waiting
    for them end with 503 instead of their last bytes, their rows are booked as 503, and new
    requests are refused (`unavailable`, /readyz) until a write succeeds. A stop while that
    lasts loses those rows, and says so in the log. At most MAX_PENDING_ROWS rows wait in memory.
    """

    def __init__(
        self,
        database: Path,
        spool_dir: Path,
        *,
        commit: str = "commit",
        flush_every_s: float = 1.0,
        max_pending: int = MAX_PENDING_ROWS,
        box_id: str = "",
    ):
        if commit not in COMMIT_MODES:
            raise ValueError(f"commit must be one of {COMMIT_MODES}")
        self.database = database
        self.box_id = box_id  # on every row: which box served it, when boxes' ledgers are added up
        self.commit = commit
        self.flush_every_s = flush_every_s
        self.max_pending = max_pending
        self.spool = UsageSpool(spool_dir, sync_each=commit == "fsync")
        self.unavailable: str | None = None
        self.failures = {"database": 0, "spool": 0}  # counted on the writer thread
        self.dropped = 0
        self._queued: list[_Pending] = []  # booked, not yet handed to a write
        self._held: list[_Pending] = []  # neither place took them: retried every flush_every_s
        self._in_write = 0
        self._events: list[dict[str, Any]] = []
        self._writing: asyncio.Task[None] | None = None
        self._unsynced = False  # "commit": written since the WAL was last fsynced
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-usage-sync")
        self._store: Store | None = None  # opened and used on the writer thread only

    # -- the request path -----------------------------------------------------------------------

    def book(self, record: RequestRecord) -> asyncio.Future[None]:
        """Book an admitted request's row. The future is done once the row is durable (at once for
        a request that was not admitted, or in "async" mode); it fails with LedgerUnavailable when
        neither the database nor the spool could take the row."""
        durable = asyncio.get_running_loop().create_future()
        durable.add_done_callback(_observed)
        if not record.admitted:
            durable.set_result(None)
            return durable
        if self.pending_rows >= self.max_pending:
            self.dropped += 1
            reason = f"{self.pending_rows} usage rows are waiting to be written (at most {self.max_pending})"
            log.error("usage row of %s dropped: %s", record.tenant, reason)
            self._refuse(reason)
            durable.set_exception(LedgerUnavailable(reason))
            return durable
        row = self.row(record)
        if self.commit == "async":  # written by the tick, after the response
            durable.set_result(None)
            self._queued.append(_Pending(row, None))
        else:
            self._queued.append(_Pending(row, durable))
            self._start_writing()
        return durable

    def row(self, record: RequestRecord) -> dict[str, Any]:
        """The usage row of a record, as the ledger writes it (with its uid and this box's id): for
        a writer that commits it in a transaction of its own (a batch line's, with its result)."""
        return record.row() | {"uid": uuid.uuid4().hex, "box_id": self.box_id or None}

    def event(self, kind: str, *, tenant: str = "", version: str = "", detail: str = "") -> None:
        """An event the request path raises (a quota warning), written with the next rows (kept
        in memory while the database takes none; the oldest go past MAX_PENDING_EVENTS)."""
        self._keep_events(
            [{"ts": _now(), "kind": kind, "tenant": tenant, "version": version, "detail": detail}]
        )
        self._start_writing()

    def _keep_events(self, events: list[dict[str, Any]]) -> None:
        """Events wait in order, the newest MAX_PENDING_EVENTS of them."""
        self._events = [*self._events, *events][-MAX_PENDING_EVENTS:]

    @property
    def pending_rows(self) -> int:
        return len(self._queued) + self._in_write + len(self._held)

    def health(self) -> LedgerHealth:
        return LedgerHealth(
            pending_rows=self.pending_rows,
            spooled_rows=self.spool.rows,
            write_failures=dict(self.failures),
            dropped_rows=self.dropped,
            unavailable=self.unavailable,
            spool_dir=str(self.spool.directory),
        )

    # -- writing ----------------------------------------------------------------------------------

    def _start_writing(self) -> None:
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queued or self._events:
            batch, self._queued = self._queued, []
            events, self._events = self._events, []
            self._in_write = len(batch)
            try:
                where = await loop.run_in_executor(self._writer, self._write, [p.row for p in batch], events)
            except _Unwritable as exc:
                self._in_write = 0
                self._events, waiting = events, self._events
                self._keep_events(waiting)
                if not batch:
                    return  # only events: they wait for the next rows or the next tick
                self._refuse(str(exc))
                for pending in batch:
                    if pending.durable is not None and not pending.durable.done():
                        pending.row["status"] = UNBOOKED_STATUS  # its response ends 503, not 200
                        pending.durable.set_exception(LedgerUnavailable(str(exc)))
                    pending.durable = None
                self._held.extend(batch)
                return  # the held rows are tried again every flush_every_s (run)
            self._in_write = 0
            if where == "spool":  # the spool keeps rows only: the events wait for the database
                self._events, waiting = events, self._events
                self._keep_events(waiting)
            else:
                self._unsynced = True
            for pending in batch:
                if pending.durable is not None and not pending.durable.done():
                    pending.durable.set_result(None)
            if self._held:  # it writes again: what failed before goes next
                self._queued[:0], self._held = self._held, []
            elif self.unavailable is not None:
                log.warning("usage rows are written again (%s): admitting requests", where)
                self.unavailable = None
            if where == "spool" and not self._queued:
                return  # the events alone wait for the tick, not for another failed attempt

    def _refuse(self, reason: str) -> None:
        if self.unavailable is None:
            log.error("usage ledger: %s. New requests are refused (503) until rows can be written", reason)
        self.unavailable = reason

    def _connect(self) -> Store:
        if self._store is None:
            # Never waits for a lock: a batch the database cannot take at once goes to the spool.
            self._store = Store.connect(self.database, busy_timeout_ms=0)
            # In WAL mode NORMAL commits without an fsync; a commit is still atomic, and safe from
            # a crash of this process (the OS has the WAL). FULL fsyncs every commit.
            self._store.db.execute(f"PRAGMA synchronous = {'FULL' if self.commit == 'fsync' else 'NORMAL'}")
        return self._store

    def _write(self, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
        """On the writer thread: the database if it takes them at once, else the spool (rows
        only). Returns where they went; raises _Unwritable when neither took them."""
        try:
            store = self._connect()
            with store.writing():
                store.record_usage(rows)
                if events:
                    store.db.table("events").insert_all(events)
            return "database"
        except (sqlite3.Error, StoreError) as exc:
            self.failures["database"] += 1
            database = str(unavailable(exc, self.database) if isinstance(exc, sqlite3.Error) else exc)
        if not rows:
            raise _Unwritable(database)
        try:
            self.spool.append(rows)
        except OSError as exc:
            self.failures["spool"] += 1
            raise _Unwritable(
                f"{database}; and the usage spool {self.spool.directory} cannot take the rows either: "
                f"{exc.strerror or exc}"
            ) from exc
        return "spool"

    def _replay(self, store: Store | None = None) -> int:
        """The spool into the database (0 if it still takes nothing); on the writer thread with
        its connection, or before serving with `store`."""
        try:
            return self.spool.replay(store or self._connect(), self.database)
        except (sqlite3.Error, StoreError, OSError) as exc:
            self.failures["database"] += 1
            log.debug("usage spool not replayed yet: %s", exc)
            return 0

    def recover(self) -> None:
        """Before serving (not on the event loop): book what an earlier run left in the spool."""
        if self.spool.rows:
            with Store.open(self.database) as store:  # start-up may wait for a lock a little
                replayed = self._replay(store)
            if replayed:
                log.info("booked %d usage rows from the spool %s", replayed, self.spool.directory)
            if self.spool.rows:
                log.warning(
                    "%d usage rows wait in the spool %s: the database takes no writes yet; they are "
                    "booked as soon as it does",
                    self.spool.rows,
                    self.spool.directory,
                )

    def _close(self) -> None:
        try:
            self.spool.close()
        except OSError as exc:
            log.error("could not sync the usage spool %s: %s", self.spool.directory, exc)
        if self._store is not None:
            self._store.db.close()
            self._store = None

    async def flush(self) -> None:
        """Write everything booked so far (rows kept after a failure included); returns once it is
        written, spooled, or kept after failing again."""
        if self._writing is not None and not self._writing.done():
            await self._writing  # what it took, and what came meanwhile
        if self._held:
            self._queued[:0], self._held = self._held, []
        if self._queued or self._events:
            self._start_writing()
            assert self._writing is not None
            await self._writing

    async def replay(self) -> None:
        """Book the spool's rows into the database, if there are any and it takes them now."""
        if self.spool.rows:
            replayed = await asyncio.get_running_loop().run_in_executor(self._writer, self._replay)
            if replayed:
                log.info("booked %d usage rows from the spool", replayed)

    async def sync(self) -> None:
        """ "commit" mode: fsync the WAL and the spool's open file on a thread of their own, so that
        the writer goes on meanwhile (an fsync can take seconds on a busy disk)."""
        if self.commit != "commit":
            return
        loop = asyncio.get_running_loop()
        spool = (
            await loop.run_in_executor(self._writer, self.spool.take_unsynced) if self.spool.rows else None
        )
        if self._unsynced or spool is not None:
            self._unsynced = False
            await loop.run_in_executor(self._syncer, self._sync_files, spool)

    def _sync_files(self, spool: int | None) -> None:
        try:
            fsync_path(Path(f"{self.database}-wal"))
        except OSError:
            log.exception("cannot sync %s-wal", self.database)
        if spool is not None:
            try:
                os.fsync(spool)
            except OSError:
                log.exception("cannot sync the usage spool %s", self.spool.directory)
            finally:
                os.close(spool)

    async def run(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: write periodically (rows booked in "async" mode, and any a
        failed write kept), replay the spool, fsync in "commit" mode; on shutdown write what is
        left, replay what the database takes, and say what could not be written."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.flush_every_s)
                await self.flush()
                await self.replay()
                await self.sync()

        async with background.running(loop()):  # a write on the writer thread finishes before the last one
            yield
        await self.flush()
        await self.replay()
        await self.sync()
        self._report_leftovers()
        await asyncio.get_running_loop().run_in_executor(self._writer, self._close)
        self._writer.shutdown()
        self._syncer.shutdown()

    def _report_leftovers(self) -> None:
        lost = self.pending_rows
        if lost:
            log.error(
                "%d usage rows could not be written anywhere and are lost (%s); their requests "
                "were answered 503",
                lost,
                self.unavailable,
            )
        if self.spool.rows:
            log.warning(
                "%d usage rows stay in the spool %s (the database took no writes); they are booked "
                "when lorabox next starts",
                self.spool.rows,
                self.spool.directory,
            )


class _Unwritable(Exception):
    """Neither the database nor the spool took a write (on the writer thread)."""


def _observed(future: asyncio.Future[None]) -> None:
    """A refused row's future may have no one awaiting it (a request that ended in an error is
    booked without waiting): its exception is seen here, not reported as never retrieved."""
    if not future.cancelled():
        future.exception()
