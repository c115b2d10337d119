"""The usage ledger: batched, written off the event loop, nothing lost on errors or shutdown."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from appliance.tenancy.ledger import UsageLedger
from appliance.tenancy.store import Store


def row(tenant: str, tokens: int) -> dict[str, object]:
    return {
        "tenant": tenant,
        "model": tenant,
        "adapter_version": "v1",
        "endpoint": "completions",
        "prompt_tokens": 3,
        "completion_tokens": tokens,
        "finish_reason": "length",
        "status": 200,
        "latency_ms": 1.5,
    }


def stored(database: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(database) as db:
        return db.execute("select tenant, completion_tokens from usage order by id").fetchall()


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "lorabox.db"
    Store.connect(path).db.close()  # migrated, as the daemon leaves it
    return path


async def test_rows_are_written_in_a_batch_by_the_writer_thread(database, monkeypatch):
    threads = []
    original = Store.record_usage

    def spy(self: Store, rows: list[dict[str, object]]) -> None:
        threads.append(threading.current_thread().name)
        original(self, rows)

    monkeypatch.setattr(Store, "record_usage", spy)
    ledger = UsageLedger(database)
    for i in range(3):
        ledger.record(**row("acme", i))
    assert stored(database) == []  # buffered until the flush
    await ledger.flush()
    assert stored(database) == [("acme", 0), ("acme", 1), ("acme", 2)]
    assert len(threads) == 1
    assert threads[0].startswith("lorabox-usage")
    assert threads[0] != threading.current_thread().name
    await ledger.flush()  # nothing new: no write at all
    assert len(threads) == 1


async def test_a_failed_write_keeps_its_rows_for_the_next_flush(database, monkeypatch):
    original = Store.record_usage
    failures = iter([sqlite3.OperationalError("database is locked")])

    def flaky(self: Store, rows: list[dict[str, object]]) -> None:
        for failure in failures:
            raise failure
        original(self, rows)

    monkeypatch.setattr(Store, "record_usage", flaky)
    ledger = UsageLedger(database)
    ledger.record(**row("acme", 1))
    await ledger.flush()
    assert stored(database) == []
    ledger.record(**row("globex", 2))
    await ledger.flush()
    assert stored(database) == [("acme", 1), ("globex", 2)]  # in the order they were recorded


async def test_shutdown_writes_what_is_left(database):
    ledger = UsageLedger(database, flush_every_s=3600)
    lifetime = ledger.run()
    await lifetime.__anext__()  # the daemon is serving
    ledger.record(**row("initech", 7))
    with pytest.raises(StopAsyncIteration):
        await lifetime.__anext__()  # the daemon stops
    assert stored(database) == [("initech", 7)]
