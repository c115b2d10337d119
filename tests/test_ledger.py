"""The usage ledger: batched, written off the event loop, nothing lost on errors or shutdown; what
SQLite cannot take at once goes to the spool and is booked from there exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance.tenancy.ledger import LedgerUnavailable, RequestRecord
from appliance.tenancy.ledger import UsageLedger as Ledger
from appliance.tenancy.store import Store


def record(tenant: str, tokens: int, *, admitted: bool = True) -> RequestRecord:
    return RequestRecord(
        tenant=tenant,
        key_id="k1",
        model=tenant,
        adapter_version="v1",
        endpoint="completions",
        engine="vllm",
        status=200 if admitted else 429,
        finish_reason="length",
        prompt_tokens=3,
        completion_tokens=tokens,
        ttft_ms=0.5,
        latency_ms=1.5,
        price_in=0.25,
        price_out=1.0,
        admitted=admitted,
    )


def stored(database: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(database) as db:
        return db.execute("select tenant, completion_tokens from usage order by id").fetchall()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "lorabox.db"
    Store.connect(path).db.close()  # migrated, as the daemon leaves it
    return path


def UsageLedger(database: Path, **options: Any) -> Ledger:
    """The ledger, with its spool beside the database unless the test says otherwise."""
    return Ledger(database, options.pop("spool_dir", database.parent / "spool"), **options)


async def test_rows_booked_together_are_committed_together_by_the_writer_thread(database, monkeypatch):
    threads, batches = [], []
    original = Store.record_usage

    def spy(self: Store, rows: list[dict[str, object]]) -> None:
        threads.append(threading.current_thread().name)
        batches.append(len(rows))
        original(self, rows)

    monkeypatch.setattr(Store, "record_usage", spy)
    ledger = UsageLedger(database)
    first = ledger.book(record("acme", 0))
    await asyncio.sleep(0)  # the commit of the first has begun
    rest = [ledger.book(record("acme", i)) for i in (1, 2)]  # booked while it runs: the next group
    assert not first.done()
    await asyncio.gather(first, *rest)
    assert stored(database) == [("acme", 0), ("acme", 1), ("acme", 2)]
    assert batches == [1, 2]
    assert all(name.startswith("lorabox-usage") for name in threads)
    assert threading.current_thread().name not in threads
    await ledger.flush()  # nothing new: no write at all
    assert len(batches) == 2


async def test_a_booked_row_is_on_disk_once_its_future_is_done(database):
    """What the request path relies on to send its last byte: the commit, seen by another connection."""
    ledger = UsageLedger(database)
    for tokens in range(5):
        await ledger.book(record("acme", tokens))
        assert stored(database)[-1] == ("acme", tokens)


@pytest.mark.parametrize(("mode", "synchronous"), [("fsync", 2), ("commit", 1)])
async def test_fsync_mode_syncs_every_commit_and_commit_mode_the_wal_every_second(
    database, monkeypatch, mode, synchronous
):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    ledger = UsageLedger(database, commit=mode)
    await ledger.book(record("acme", 1))
    store = ledger._store
    assert store is not None
    pragma = await asyncio.get_running_loop().run_in_executor(
        ledger._writer, lambda: store.db.execute("PRAGMA synchronous").fetchone()
    )
    assert pragma == (synchronous,)
    await ledger.sync()
    assert synced == ([f"{database}-wal"] if mode == "commit" else [])
    await ledger.sync()  # nothing written since: nothing to sync
    assert len(synced) == (mode == "commit")


async def test_in_async_mode_rows_wait_for_the_periodic_write(database):
    ledger = UsageLedger(database, commit="async")
    booked = ledger.book(record("acme", 1))
    assert booked.done()
    await asyncio.sleep(0.05)
    assert stored(database) == []
    await ledger.flush()
    assert stored(database) == [("acme", 1)]


async def test_events_are_written_with_the_rows(database):
    ledger = UsageLedger(database)
    ledger.event("quota_warning", tenant="acme", detail="80% of 100 tokens this month")
    await ledger.flush()
    with Store.open(database) as store:
        [event] = store.events(limit=1)
    assert (event["kind"], event["tenant"]) == ("quota_warning", "acme")


async def test_shutdown_writes_what_is_left(database):
    ledger = UsageLedger(database, commit="async", flush_every_s=3600)
    lifetime = ledger.run()
    await lifetime.__anext__()  # the daemon is serving
    ledger.book(record("initech", 7))
    with pytest.raises(StopAsyncIteration):
        await lifetime.__anext__()  # the daemon stops
    assert stored(database) == [("initech", 7)]


async def test_only_admitted_requests_are_booked_with_their_billing_fields(database):
    ledger = UsageLedger(database)
    await ledger.book(record("acme", 4))
    refused = ledger.book(record("acme", 0, admitted=False))  # refused at admission: telemetry only
    assert refused.done()
    await ledger.flush()
    with sqlite3.connect(database) as db:
        rows = db.execute("select tenant, key_id, engine, ttft_ms, status, price_in from usage").fetchall()
    assert rows == [("acme", "k1", "vllm", 0.5, 200, 0.25)]


def test_a_served_request_is_booked_with_its_key_engine_and_first_token_time(server):
    """Live: the row names the key that paid and the engine that served; 404s are not booked."""
    import time

    from openai import NotFoundError, OpenAI

    key = server.demo.keys["globex"]
    key_id = key.split("-")[1]  # keys read lbx-<key id>-<secret>
    client = OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    marker = "ledger-seam"  # a model name no other test asks for, to find this request's rows
    with pytest.raises(NotFoundError):
        client.completions.create(model=marker, prompt="Hello", max_tokens=2)
    before = time.time()
    served = client.completions.create(
        model="globex", prompt="Hello", max_tokens=3, temperature=0, user=marker
    )
    assert served.usage is not None
    assert served.usage.completion_tokens >= 1
    database = server.demo.database
    deadline = time.time() + 10
    rows: list[tuple[object, ...]] = []
    while time.time() < deadline and not rows:
        with sqlite3.connect(database) as db:
            rows = db.execute(
                "select key_id, engine, ttft_ms, latency_ms, completion_tokens, status from usage "
                "where tenant = 'globex' and ts >= ? order by id",
                [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before - 1))],
            ).fetchall()
        time.sleep(0.2)
    with sqlite3.connect(database) as db:
        assert db.execute("select count(*) from usage where model = ?", [marker]).fetchone() == (0,)
    assert rows, "no usage row for the served request"
    key_column, engine, ttft_ms, latency_ms, completion_tokens, status = rows[-1]
    served_tokens = served.usage.completion_tokens
    assert (key_column, engine, completion_tokens, status) == (key_id, "vllm", served_tokens, 200)
    assert 0 < ttft_ms <= latency_ms


# -- the spool: what the database cannot take at once ---------------------------------------------


class WriteLock:
    """Another connection holding the database's write lock (BEGIN IMMEDIATE), as an operator's
    `sqlite3` session would, until released."""

    def __init__(self, database: Path):
        self.db = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def spooled(ledger: Ledger) -> list[tuple[str, int]]:
    rows = []
    for path in ledger.spool.segments():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows.append((row["tenant"], row["completion_tokens"]))
    return rows


async def test_a_locked_database_costs_a_response_no_wait_its_row_is_spooled_then_booked_once(database):
    ledger = UsageLedger(database)
    lock = WriteLock(database)
    try:
        # Durable while the lock is still held: the ledger waited for no lock (the old one waited
        # out SQLite's 5 s busy timeout, then let the response go with no durable row at all).
        await asyncio.wait_for(ledger.book(record("acme", 1)), 30)
        await asyncio.wait_for(ledger.book(record("globex", 2)), 30)
        assert spooled(ledger) == [("acme", 1), ("globex", 2)]
        assert ledger.health().spooled_rows == 2
        assert ledger.health().write_failures["database"] >= 2
        store = ledger._store
        assert store is not None
        timeout = await asyncio.get_running_loop().run_in_executor(
            ledger._writer, lambda: store.db.execute("PRAGMA busy_timeout").fetchone()
        )
        assert timeout == (0,)  # it never waits for another program's lock
        await ledger.replay()  # the lock holds: the rows stay where they are
        assert ledger.spool.rows == 2
    finally:
        lock.release()
    assert stored(database) == []
    await ledger.replay()
    assert stored(database) == [("acme", 1), ("globex", 2)]
    assert spooled(ledger) == []
    assert ledger.spool.rows == 0
    await ledger.book(record("initech", 3))  # the database takes rows again, directly
    assert stored(database)[-1] == ("initech", 3)
    assert spooled(ledger) == []


async def test_a_replay_cut_short_after_its_commit_books_nothing_twice(database, monkeypatch):
    ledger = UsageLedger(database)
    lock = WriteLock(database)
    await ledger.book(record("acme", 5))
    lock.release()

    def crash(self: Path, missing_ok: bool = False) -> None:
        raise OSError("killed between the commit and the spool file's removal")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", crash)
        await ledger.replay()
    assert stored(database) == [("acme", 5)]
    assert ledger.spool.segments()
    restarted = UsageLedger(database)  # the next start finds the file again
    assert restarted.spool.rows == 1
    restarted.recover()
    assert stored(database) == [("acme", 5)]  # once
    assert restarted.spool.segments() == []


async def test_a_line_cut_short_is_skipped_and_the_rest_is_booked(database, caplog):
    ledger = UsageLedger(database)
    lock = WriteLock(database)
    await ledger.book(record("acme", 1))
    lock.release()
    [segment] = ledger.spool.segments()
    with segment.open("a") as file:
        file.write('{"uid": "x", "tenant": "acme", "completion_tok')  # a power cut mid-append
    await ledger.replay()
    assert stored(database) == [("acme", 1)]
    assert "not a whole row" in caplog.text


async def test_when_neither_takes_a_row_the_response_is_refused_and_new_requests_wait(database, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the spool cannot be made: as a full disk refuses it
    ledger = UsageLedger(database, spool_dir=blocker / "spool")
    lock = WriteLock(database)
    try:
        with pytest.raises(LedgerUnavailable, match="spool"):
            await asyncio.wait_for(ledger.book(record("acme", 7)), 30)
        health = ledger.health()
        assert health.unavailable is not None
        assert "busy" in health.unavailable
        assert health.pending_rows == 1
        assert health.write_failures["spool"] == 1
        await ledger.flush()  # tried again: still nowhere to go
        assert ledger.unavailable is not None
    finally:
        lock.release()
    await ledger.flush()  # the database takes writes again: the kept row is booked, as refused
    with sqlite3.connect(database) as db:
        assert db.execute("select tenant, completion_tokens, status from usage").fetchall() == [
            ("acme", 7, 503)
        ]
    assert ledger.unavailable is None
    assert ledger.pending_rows == 0


async def test_rows_waiting_in_memory_are_bounded(database):
    ledger = UsageLedger(database, commit="async", max_pending=2)
    first, second = ledger.book(record("acme", 1)), ledger.book(record("acme", 2))
    third = ledger.book(record("acme", 3))
    assert first.done()
    assert second.done()
    with pytest.raises(LedgerUnavailable, match="at most 2"):
        third.result()
    assert ledger.health().dropped_rows == 1
    assert ledger.unavailable is not None
    await ledger.flush()
    assert stored(database) == [("acme", 1), ("acme", 2)]
    assert ledger.unavailable is None  # written: requests are admitted again


async def test_a_stop_says_what_it_could_not_write(database, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    ledger = UsageLedger(database, spool_dir=blocker / "spool", commit="async", flush_every_s=3600)
    lifetime = ledger.run()
    await lifetime.__anext__()
    lock = WriteLock(database)
    try:
        ledger.book(record("acme", 1))
        with pytest.raises(StopAsyncIteration):
            await lifetime.__anext__()
    finally:
        lock.release()
    assert "1 usage rows could not be written anywhere and are lost" in caplog.text


async def test_rows_left_in_the_spool_at_a_stop_are_said_and_booked_at_the_next_start(database, caplog):
    ledger = UsageLedger(database, flush_every_s=3600)
    lifetime = ledger.run()
    await lifetime.__anext__()
    lock = WriteLock(database)
    try:
        await ledger.book(record("acme", 4))
        with pytest.raises(StopAsyncIteration):
            await lifetime.__anext__()
        assert "1 usage rows stay in the spool" in caplog.text
        restarted = UsageLedger(database)
        assert restarted.spool.tokens_since("2000") == {"acme": 3 + 4}  # quotas count them already
    finally:
        lock.release()
    restarted.recover()
    assert stored(database) == [("acme", 4)]


async def test_a_long_lock_keeps_one_spool_file_and_syncs_it_off_the_writer_thread(database, monkeypatch):
    """The tick replays and syncs every second: under a lock neither may cost the writer (which
    responses wait for) an fsync, nor leave a new file behind each second."""
    ledger = UsageLedger(database)
    lock = WriteLock(database)
    try:
        for tokens in range(3):
            await ledger.book(record("acme", tokens))
            await ledger.replay()  # the database takes nothing yet
        assert len(ledger.spool.segments()) == 1
        synced = []
        fsync = os.fsync

        def spy(fd: int) -> None:
            synced.append((threading.current_thread().name, os.readlink(f"/proc/self/fd/{fd}")))
            fsync(fd)

        monkeypatch.setattr(os, "fsync", spy)
        await ledger.sync()
        [(thread, path)] = [(t, p) for t, p in synced if p.endswith(".jsonl")]
        assert thread.startswith("lorabox-usage-sync")
        assert Path(path) == ledger.spool.segments()[0]
    finally:
        lock.release()
    await ledger.replay()
    assert stored(database) == [("acme", 0), ("acme", 1), ("acme", 2)]
