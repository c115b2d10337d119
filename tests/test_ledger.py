"""The usage ledger: batched, written off the event loop, nothing lost on errors or shutdown."""

from __future__ import annotations

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


async def test_rows_are_written_in_a_batch_by_the_writer_thread(database, monkeypatch):
    threads = []
    original = Store.record_usage

    def spy(self: Store, rows: list[dict[str, object]]) -> None:
        threads.append(threading.current_thread().name)
        original(self, rows)

    monkeypatch.setattr(Store, "record_usage", spy)
    ledger = UsageLedger(database)
    for i in range(3):
        ledger.record(record("acme", i))
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
    ledger.record(record("acme", 1))
    await ledger.flush()
    assert stored(database) == []
    ledger.record(record("globex", 2))
    await ledger.flush()
    assert stored(database) == [("acme", 1), ("globex", 2)]  # in the order they were recorded


async def test_shutdown_writes_what_is_left(database):
    ledger = UsageLedger(database, flush_every_s=3600)
    lifetime = ledger.run()
    await lifetime.__anext__()  # the daemon is serving
    ledger.record(record("initech", 7))
    with pytest.raises(StopAsyncIteration):
        await lifetime.__anext__()  # the daemon stops
    assert stored(database) == [("initech", 7)]


async def test_only_admitted_requests_are_booked_with_their_billing_fields(database):
    ledger = UsageLedger(database)
    ledger.record(record("acme", 4))
    ledger.record(record("acme", 0, admitted=False))  # refused before generation: telemetry only
    await ledger.flush()
    with sqlite3.connect(database) as db:
        rows = db.execute("select tenant, key_id, engine, ttft_ms, status from usage").fetchall()
    assert rows == [("acme", "k1", "vllm", 0.5, 200)]


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
