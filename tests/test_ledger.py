"""The usage ledger: batched, written off the event loop, nothing lost on errors or shutdown."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.tenancy.ledger import RequestRecord, UsageLedger
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


async def test_a_failed_write_keeps_its_rows_and_lets_the_requests_go(database, monkeypatch):
    original = Store.record_usage
    failures = iter([sqlite3.OperationalError("database is locked")])

    def flaky(self: Store, rows: list[dict[str, object]]) -> None:
        for failure in failures:
            raise failure
        original(self, rows)

    monkeypatch.setattr(Store, "record_usage", flaky)
    ledger = UsageLedger(database)
    await asyncio.wait_for(ledger.book(record("acme", 1)), 5)  # not held: logged instead
    assert stored(database) == []
    await ledger.book(record("globex", 2))
    assert stored(database) == [("acme", 1), ("globex", 2)]  # in the order they were booked


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
