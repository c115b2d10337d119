"""OpenAI's Batch API through the official client against the session's llama.cpp daemon: a
200-line batch answers each line as the same request does interactively; bad lines become error
lines; another tenant can neither see nor use the files and batches."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import statistics
import time
import urllib.request
from collections import Counter
from typing import Any

import openai
import pytest
from openai import OpenAI

from appliance.api.adminclient import AdminClient
from appliance.ops.report import status_text
from tests.conftest import Server, no_loop_stall

PROMPTS = [f"Write one line about customer {n}'s order." for n in range(10)]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(llamacpp_server: Server) -> Server:
    return llamacpp_server


def client(server: Server, tenant: str) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=server.demo.keys[tenant], max_retries=0)


def line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


def chat(prompt: str, model: str = "acme") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


def run_batch(acme: OpenAI, data: bytes, within_s: float = 600) -> Any:
    uploaded = acme.files.create(file=("day.jsonl", io.BytesIO(data)), purpose="batch")
    batch = acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    deadline = time.monotonic() + within_s
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
        batch = acme.batches.retrieve(batch.id)
    return batch


def read(acme: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in acme.files.content(file_id).content.splitlines()]


def test_a_200_line_batch_answers_as_interactive_requests(server: Server) -> None:
    acme = client(server, "acme")
    interactive = {
        p: acme.chat.completions.create(**chat(p)).choices[0].message.content
        for p in PROMPTS  # type: ignore[call-overload]
    }
    data = b"".join(line(f"req-{i}", chat(PROMPTS[i % len(PROMPTS)])) for i in range(200))
    batch = run_batch(acme, data)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == batch.request_counts.completed == 200
    assert batch.error_file_id is None
    output = read(acme, batch.output_file_id)
    assert Counter(x["custom_id"] for x in output) == Counter(f"req-{i}" for i in range(200))
    for result in output:
        i = int(result["custom_id"].removeprefix("req-"))
        response = result["response"]
        assert response["status_code"] == 200
        assert response["body"]["object"] == "chat.completion"
        assert response["body"]["choices"][0]["message"]["content"] == interactive[PROMPTS[i % len(PROMPTS)]]
    assert batch in [b for b in acme.batches.list()]
    # Each line booked once in the usage ledger, as a batch line, with the batch's id.
    deadline = time.monotonic() + 60
    while (rows := ledger_rows(server, batch.id)) != Counter({("batch", 200): 200}):
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def ledger_rows(server: Server, batch_id: str) -> Counter[tuple[str, int]]:
    with contextlib.closing(sqlite3.connect(f"file:{server.demo.database}?mode=ro", uri=True)) as db:
        rows = db.execute("select tier, status from usage where batch_id = ?", [batch_id]).fetchall()
    return Counter((tier, status) for tier, status in rows)


def test_bad_lines_become_error_lines_and_the_rest_completes(server: Server) -> None:
    acme = client(server, "acme")
    admin = AdminClient(server.demo.dir / "state" / "admin.sock")
    data = b"".join(
        [
            line("good-1", chat(PROMPTS[0])),
            b'{"custom_id": "broken", "body": \n',
            line("wrong-url", chat(PROMPTS[1]), url="/v1/completions"),
            line("their-model", chat(PROMPTS[2], model="globex")),
            line("streaming", chat(PROMPTS[3]) | {"stream": True}),
            line("bad-param", chat(PROMPTS[4]) | {"temperature": "hot"}),
            line("over-cap", chat(PROMPTS[6]) | {"max_tokens": 40}),
            line("good-2", chat(PROMPTS[5])),
        ]
    )
    admin.call("POST", "/admin/tenants/acme/policy", {"max_tokens": 20})  # the tenant's cap
    try:
        batch = run_batch(acme, data)
    finally:
        admin.call("POST", "/admin/tenants/acme/policy", {"reset": ["max_tokens"]})
    assert batch.status == "completed", batch
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (8, 2, 6)
    assert {x["custom_id"] for x in read(acme, batch.output_file_id)} == {"good-1", "good-2"}
    errors = {x["custom_id"]: x for x in read(acme, batch.error_file_id)}
    assert set(errors) == {None, "wrong-url", "their-model", "streaming", "bad-param", "over-cap"}
    assert errors[None]["error"]["code"] == "invalid_json"
    assert errors["wrong-url"]["error"]["code"] == "invalid_url"
    assert errors["their-model"]["response"]["status_code"] == 404
    assert errors["their-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["streaming"]["response"]["body"]["error"]["param"] == "stream"
    assert errors["bad-param"]["response"]["body"]["error"]["param"] == "temperature"
    assert errors["over-cap"]["response"]["status_code"] == 400
    assert errors["over-cap"]["response"]["body"]["error"]["param"] == "max_tokens"


def test_another_tenant_cannot_see_or_use_a_batch(server: Server) -> None:
    acme, globex = client(server, "acme"), client(server, "globex")
    uploaded = acme.files.create(file=("a.jsonl", io.BytesIO(line("x", chat(PROMPTS[0])))), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        globex.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    batch = acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        globex.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        globex.batches.cancel(batch.id)
    assert batch.id not in [b.id for b in globex.batches.list()]
    with pytest.raises(openai.BadRequestError) as caught:
        acme.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "endpoint"  # type: ignore[index]


def band_load(admin: AdminClient, tenant: str) -> dict[str, int]:
    row = next(t for t in admin.call("GET", "/admin/tenants")["tenants"] if t["name"] == tenant)
    return {k: row["stats"][k] for k in ("running", "queued", "background_running", "background_queued")}


def test_a_100k_line_file_validates_without_stalling_and_cancel_keeps_the_finished(server: Server) -> None:
    """Validation parses and stores 100,000 lines with the event loop never over 100 ms late; a
    cancel then ends the batch within 5 s, its output holding the lines that finished."""
    admin = AdminClient(server.demo.dir / "state" / "admin.sock")
    admin.call("POST", "/admin/tenants/initech/policy", {"batch_max_lines": 100_000})
    try:
        initech = client(server, "initech")
        data = b"".join(
            line(f"n-{i}", chat(PROMPTS[i % len(PROMPTS)], model="initech")) for i in range(100_000)
        )
        with no_loop_stall(server.demo):
            uploaded = initech.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
            batch = initech.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            deadline = time.monotonic() + 300
            while (batch := initech.batches.retrieve(batch.id)).request_counts.completed < 3:
                assert time.monotonic() < deadline, batch
                time.sleep(0.1)
        assert batch.status == "in_progress"
        assert batch.request_counts.total == 100_000
        # What the owner sees of it: the admin API (the TUI's batch panel), lorabox status, /metrics.
        status = admin.call("GET", "/admin/status")
        shown = {job["id"]: job for job in status["batches"]["jobs"]}[batch.id]
        assert (shown["tenant"], shown["total"]) == ("initech", 100_000)
        assert status["batches"]["band"]["places"] >= 1
        assert f"initech {batch.id} in_progress: " in status_text(status, [])
        with urllib.request.urlopen(f"{server.local.metrics_url}") as response:  # noqa: S310 (ours)
            metrics = response.read().decode()
        assert 'lorabox_batch_lines_remaining{tenant="initech"}' in metrics
        assert "lorabox_batch_band_places " in metrics
        # The tenant's row (the TUI's run and queue cells): its lines in the background band,
        # apart from its interactive requests (none). Looked at until a line is in the band: the
        # runner hands the band a line as another ends.
        while not (band := band_load(admin, "initech"))["background_running"]:
            assert time.monotonic() < deadline, band
            time.sleep(0.05)
        assert band["running"] == band["queued"] == 0
        with urllib.request.urlopen(f"{server.local.metrics_url}") as response:  # noqa: S310 (ours)
            metrics = response.read().decode()
        assert 'lorabox_tenant_background_running{tenant="initech"}' in metrics  # the band's, apart
        assert 'lorabox_tenant_requests_running{tenant="initech"} 0.0' in metrics
        cancelling = initech.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        asked = time.monotonic()
        while (batch := initech.batches.retrieve(batch.id)).status != "cancelled":
            assert time.monotonic() - asked < 5, batch
            time.sleep(0.05)
    finally:
        admin.call("POST", "/admin/tenants/initech/policy", {"reset": ["batch_max_lines"]})
        for running in initech.batches.list(limit=5):  # a failure above must not leave it running
            if running.status in ("validating", "in_progress"):
                initech.batches.cancel(running.id)
    output = read(initech, batch.output_file_id)
    assert len(output) == batch.request_counts.completed
    assert len(output) >= 3
    assert len({x["custom_id"] for x in output}) == len(output)
    assert all(x["response"]["status_code"] == 200 for x in output)


def test_batch_lines_pass_the_rate_limits_and_stop_at_the_hard_quota(server: Server) -> None:
    """RPM and TPM limit interactive traffic only: with one request a minute spent, a batch still
    completes. The quota counts batch lines: one that would cross it stops the batch there, which
    ends `failed`, the lines left as `insufficient_quota` errors and the finished ones kept."""
    admin = AdminClient(server.demo.dir / "state" / "admin.sock")
    globex = client(server, "globex")
    admin.call("POST", "/admin/tenants/globex/policy", {"rpm": 1, "tpm": 100})
    try:
        globex.chat.completions.create(**chat(PROMPTS[0], model="globex"))  # type: ignore[call-overload]
        with pytest.raises(openai.RateLimitError):
            globex.chat.completions.create(**chat(PROMPTS[1], model="globex"))  # type: ignore[call-overload]
        # Eight lines reserving about 8 x 40 tokens, more than the 100 a minute an interactive
        # client may use.
        lines = b"".join(line(f"r-{i}", chat(PROMPTS[i], model="globex")) for i in range(8))
        batch = run_batch(globex, lines, within_s=120)  # rate limited, it would take 4 minutes
        assert (batch.status, batch.request_counts.completed) == ("completed", 8), batch
        with pytest.raises(openai.RateLimitError):  # the bucket is as the batch found it
            globex.chat.completions.create(**chat(PROMPTS[1], model="globex"))  # type: ignore[call-overload]

        used = admin.call("GET", "/admin/tenants/globex/policy")["quota"]["used_tokens"]
        admin.call("POST", "/admin/tenants/globex/policy", {"quota_tokens": used + 100})
        batch = run_batch(
            globex, b"".join(line(f"q-{i}", chat(PROMPTS[i], model="globex")) for i in range(10))
        )
    finally:
        admin.call("POST", "/admin/tenants/globex/policy", {"reset": ["rpm", "tpm", "quota_tokens"]})
    counts = batch.request_counts
    assert batch.status == "failed", batch
    assert 1 <= counts.completed < 10, counts
    assert counts.completed + counts.failed == 10, counts
    finished = read(globex, batch.output_file_id)
    assert len(finished) == counts.completed
    assert all(x["response"]["status_code"] == 200 for x in finished)
    errors = read(globex, batch.error_file_id)
    assert {x["error"]["code"] for x in errors} == {"insufficient_quota"}, errors
    assert {x["custom_id"] for x in errors} | {x["custom_id"] for x in finished} == {
        f"q-{i}" for i in range(10)
    }


def test_a_flex_request_is_served_in_the_background_band_at_the_batch_price(server: Server) -> None:
    admin = AdminClient(server.demo.dir / "state" / "admin.sock")
    acme = client(server, "acme")
    admin.call("POST", "/admin/tenants/acme/policy", {"price_in": 2.0, "price_out": 8.0})
    try:
        default = acme.chat.completions.create(**chat(PROMPTS[0]), service_tier="default")  # type: ignore[call-overload]
        flex = acme.chat.completions.create(**chat(PROMPTS[0]), service_tier="flex")  # type: ignore[call-overload]
        streamed = list(acme.chat.completions.create(**chat(PROMPTS[0]), service_tier="flex", stream=True))  # type: ignore[call-overload]
    finally:
        admin.call("POST", "/admin/tenants/acme/policy", {"reset": ["price_in", "price_out"]})
    assert (default.service_tier, flex.service_tier) == ("default", "flex")
    assert {chunk.service_tier for chunk in streamed} == {"flex"}
    assert flex.choices[0].message.content == default.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        acme.chat.completions.create(**chat(PROMPTS[0]), service_tier="priority")  # type: ignore[call-overload]
    assert caught.value.body["param"] == "service_tier"  # type: ignore[index]
    deadline = time.monotonic() + 60
    expected = Counter({("default", 2.0, 8.0): 1, ("flex", 1.0, 4.0): 2})
    while (rows := priced(server)) != expected:
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)


def priced(server: Server) -> Counter[tuple[str, float, float]]:
    """acme's rows booked at the prices the flex test set, and its flex rows."""
    with contextlib.closing(sqlite3.connect(f"file:{server.demo.database}?mode=ro", uri=True)) as db:
        rows = db.execute(
            "select tier, price_in, price_out from usage where tenant = 'acme' and status = 200"
            " and (price_in = 2.0 or tier = 'flex')"
        ).fetchall()
    return Counter((tier, price_in, price_out) for tier, price_in, price_out in rows)


LINE_TOKENS = 64  # a batch line long enough that waiting for one to end would stand out
SAMPLES = 15  # B's requests per phase


def ttft_s(globex: OpenAI, prompt: str) -> float:
    """Time to the first streamed token of one request, as B's client sees it."""
    began = time.perf_counter()
    stream = globex.chat.completions.create(**chat(prompt, model="globex"), stream=True)  # type: ignore[call-overload]
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
    assert first is not None
    return first


def test_an_interactive_tenant_is_not_held_back_by_another_tenants_batch(server: Server) -> None:
    """Tenant B's time to first token alone, then while a 2,000-line batch of tenant A runs, then
    alone again (the two alone phases bracket the machine's load). Bound asserted: B's median with
    the batch is within its median alone plus a quarter of one batch line's decode time. Why: B's
    request never waits in the fair queue behind the band (it starts at once, in a place the band
    leaves); in the engine, it shares steps with the band's lines (two on this box), which on
    llama.cpp, one adapter per decode, costs B a step of A's lines per step of its own: a few steps,
    against the 64 of a line. A band that made B wait for a line to end would add half a line on
    the median. The line's decode time comes from the ledger of the same run (latency - TTFT)."""
    acme, globex = client(server, "acme"), client(server, "globex")
    alone = [ttft_s(globex, PROMPTS[i % len(PROMPTS)]) for i in range(SAMPLES)]
    body = chat(PROMPTS[0]) | {"max_tokens": LINE_TOKENS, "ignore_eos": True}
    data = b"".join(
        line(f"n-{i}", body | {"messages": [{"role": "user", "content": PROMPTS[i % 10]}]})
        for i in range(2000)
    )
    uploaded = acme.files.create(file=("night.jsonl", io.BytesIO(data)), purpose="batch")
    batch = acme.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    try:
        deadline = time.monotonic() + 300
        while (running := acme.batches.retrieve(batch.id)).request_counts.completed < 4:
            assert running.status in ("validating", "in_progress"), running
            assert time.monotonic() < deadline, running
            time.sleep(0.1)
        beside = [ttft_s(globex, PROMPTS[i % len(PROMPTS)]) for i in range(SAMPLES)]
        assert acme.batches.retrieve(batch.id).status == "in_progress"  # it ran all along
    finally:
        acme.batches.cancel(batch.id)
    while acme.batches.retrieve(batch.id).status != "cancelled":
        time.sleep(0.1)
    alone += [ttft_s(globex, PROMPTS[i % len(PROMPTS)]) for i in range(SAMPLES)]
    with contextlib.closing(sqlite3.connect(f"file:{server.demo.database}?mode=ro", uri=True)) as db:
        decode_ms = [
            latency - ttft
            for latency, ttft in db.execute(
                "select latency_ms, ttft_ms from usage where batch_id = ? and status = 200", [batch.id]
            )
        ]
    line_s = statistics.median(decode_ms) / 1000
    bound = statistics.median(alone) + line_s / 4
    figures = (
        f"B's TTFT p50/p95 alone {statistics.median(alone) * 1000:.0f}/{p95(alone) * 1000:.0f} ms, "
        f"beside the batch {statistics.median(beside) * 1000:.0f}/{p95(beside) * 1000:.0f} ms; "
        f"a line decodes in {line_s * 1000:.0f} ms (median of {len(decode_ms)}); bound {bound * 1000:.0f} ms"
    )
    print(figures)
    assert statistics.median(beside) <= bound, figures


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]
