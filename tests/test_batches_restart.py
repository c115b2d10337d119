"""A batch survives its daemon: stopped (SIGTERM) or killed (kill -9) in the middle, the restarted
daemon completes it with every line exactly once in the output and in the usage ledger. A daemon
of its own (it is restarted), llama.cpp, on the llama.cpp demo's model and adapters with a state
directory of its own."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer
from tests.conftest import SERVER_START_TIMEOUT_S, Demo

LINES = 300


def start(demo: Demo, state: Path) -> LocalServer:
    return LocalServer.start(
        demo.config,
        state.parent / "server.log",
        timeout_s=SERVER_START_TIMEOUT_S,
        env={"LORABOX_ENGINE": "llamacpp"},
        settings={"state_dir": state, "batch_max_running": 2},
    )


def line(i: int) -> bytes:
    body = {
        "model": "acme",
        "messages": [{"role": "user", "content": f"Summarise ticket {i} in a few words."}],
        "max_tokens": 6,
        "temperature": 0,
    }
    return (
        json.dumps(
            {"custom_id": f"t-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        ).encode()
        + b"\n"
    )


def retrieve(client: OpenAI, batch_id: str) -> Any:
    return client.batches.retrieve(batch_id)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_batch_completes_after_a_restart_with_every_line_once(
    how: str, llamacpp_demo: Demo, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    with Store.open(state / "lorabox.db") as store:
        store.add_tenant("acme")
        store.import_key("acme", llamacpp_demo.keys["acme"])
    server = start(llamacpp_demo, state)
    try:
        client = OpenAI(base_url=server.base_url, api_key=llamacpp_demo.keys["acme"], max_retries=0)
        uploaded = client.files.create(
            file=("t.jsonl", io.BytesIO(b"".join(map(line, range(LINES))))), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 300
        while (batch := retrieve(client, batch.id)).request_counts.completed < 64:  # one group committed
            assert time.monotonic() < deadline, batch
            time.sleep(0.05)
        if how == "SIGTERM":
            server.stop()
        else:
            server.kill()
        assert server.process.returncode is not None
    finally:
        server.kill()
    with contextlib.closing(sqlite3.connect(state / "lorabox.db")) as db:
        status, completed = db.execute(
            "select status, completed from batches where id = ?", [batch.id]
        ).fetchone()
    assert status == "in_progress"  # stopped in the middle: the test means something
    assert 64 <= completed < LINES

    server = start(llamacpp_demo, state)
    try:
        client = OpenAI(base_url=server.base_url, api_key=llamacpp_demo.keys["acme"], max_retries=0)
        deadline = time.monotonic() + 300
        while (batch := retrieve(client, batch.id)).status != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
        output = [json.loads(x) for x in client.files.content(batch.output_file_id).content.splitlines()]
    finally:
        server.stop()
    assert batch.request_counts.completed == LINES
    assert Counter(x["custom_id"] for x in output) == Counter(f"t-{i}" for i in range(LINES))
    with contextlib.closing(sqlite3.connect(state / "lorabox.db")) as db:
        rows = db.execute("select status, count(*) from usage where batch_id = ? group by status", [batch.id])
        booked = dict(rows.fetchall())
    # Every line once with its result; a line cut by the stop (SIGTERM's drain ends the running
    # ones only past drain_timeout_s) would be a 499/503 row besides, never a second 200.
    assert booked.get(200) == LINES
