"""The usage ledger as the billing record: it books exactly what clients were told they used,
streams abandoned midway included, and a row is committed before the last byte of its response,
so that a daemon killed with SIGKILL right after N responses completed has booked all N."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from appliance.api.openai import CLIENT_CLOSED
from appliance.tenancy.store import Store
from tests.conftest import Demo, Server
from tests.dedicated import start_dedicated, usage_rows

MODEL = "lorabox-demo"  # the base model: fresh tenants need no adapter of their own
LONG = 1000  # tokens: seconds of generation for the demo model, nearly its whole context (1024)


def fresh_tenant(demo: Demo) -> tuple[str, str]:
    name = f"bill-{uuid.uuid4().hex[:10]}"
    with Store.open(demo.database) as store:
        store.add_tenant(name, allow_base_model=True)
        return name, store.issue_key(name).plaintext


def complete(server: Server, key: str, max_tokens: int, *, stream: bool) -> dict[str, int]:
    """One completion read to its end; the usage the server reported."""
    body: dict[str, Any] = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        if not stream:
            return dict(json.loads(r.read())["usage"])
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    [usage] = [event["usage"] for event in events if event.get("usage")]
    return dict(usage)


def abandon(server: Server, key: str, after_chunks: int) -> int:
    """A stream the client hangs up on after `after_chunks` chunks of text; how many it read. It
    asks for far more tokens than the server can generate before it notices the hang-up."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    read = 0
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                read += 1
                if read == after_chunks:
                    break  # leaving the block closes the connection midway
    assert read == after_chunks, "the stream ended before the client could hang up on it"
    return read


def rows_of(demo: Demo, tenant: str, count: int, timeout_s: float = 20) -> list[dict[str, Any]]:
    """The tenant's rows once there are `count` (a hung-up stream is booked once the server notices)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [row for row in usage_rows(demo) if row["tenant"] == tenant]
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_the_ledger_books_what_clients_were_told_including_abandoned_streams(server: Server) -> None:
    tenant, key = fresh_tenant(server.demo)
    told = [complete(server, key, n, stream=s) for n, s in [(5, False), (17, True), (9, False), (30, True)]]
    abandoned = [abandon(server, key, after) for after in (3, 8)]
    rows = rows_of(server.demo, tenant, len(told) + len(abandoned))
    assert len(rows) == len(told) + len(abandoned)
    # Each answer's row is committed before its last byte: the first rows are the answered ones.
    answered, hung_up = rows[: len(told)], rows[len(told) :]
    assert [row["status"] for row in answered] == [200] * len(told)
    assert sum(row["prompt_tokens"] for row in answered) == sum(u["prompt_tokens"] for u in told)
    assert sum(row["completion_tokens"] for row in answered) == sum(u["completion_tokens"] for u in told)
    # What was generated is billed: at least what the client read (a chunk holds one token or
    # more), and the prompt like any other request's. Booked 499 (client gone) when the server
    # noticed the hang-up while generating, else 200 with everything (it had finished first).
    statuses = [row["status"] for row in hung_up]
    assert set(statuses) <= {CLIENT_CLOSED, 200}, statuses
    assert all(row["completion_tokens"] >= read for row, read in zip(hung_up, abandoned, strict=True))
    assert all(row["completion_tokens"] < LONG for row in hung_up if row["status"] == CLIENT_CLOSED)
    assert all(row["prompt_tokens"] == told[0]["prompt_tokens"] for row in hung_up)


def test_a_daemon_killed_right_after_n_responses_has_booked_all_n(demo: Demo, tmp_path) -> None:
    server = start_dedicated(demo, tmp_path)
    try:
        tenant, key = fresh_tenant(server.demo)
        sizes = [(4 + 3 * i, i % 2 == 0) for i in range(12)]  # streamed and not, of several lengths
        with ThreadPoolExecutor(len(sizes)) as pool:
            told = list(pool.map(lambda size: complete(server, key, size[0], stream=size[1]), sizes))
        server.local.kill()  # SIGKILL, the moment the last client has its last byte
    finally:
        server.local.kill()
    rows = [row for row in usage_rows(server.demo) if row["tenant"] == tenant]
    assert len(rows) == len(sizes)
    assert sum(row["completion_tokens"] for row in rows) == sum(u["completion_tokens"] for u in told)
