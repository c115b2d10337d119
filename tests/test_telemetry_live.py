"""Telemetry against the live demo daemon: what two fresh tenants sent is what every view shows.

Two tenants of their own (so that the counts are exact whatever other tests send): one that may
use only the base model, one that gets an adapter dropped into the folder while the daemon runs.
Each sends a known number of requests; `/admin/tenants`, the tenant detail, `/metrics`,
`lorabox status --json` and the TUI (driven by Pilot over the real admin socket) must all show
exactly those counts and token sums.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynvml
import pytest
from openai import NotFoundError, OpenAI
from prometheus_client.parser import text_string_to_metric_families
from textual.widgets import DataTable

from appliance.api.adminclient import AdminClient
from appliance.demo.build import DEMO_MODEL_NAME
from appliance.ops.cli import main
from appliance.tenancy.store import Store
from tests.conftest import no_loop_stall
from tests.test_tui import event_lines, until
from tui.app import LoraboxApp
from tui.feed import Backoff
from tui.screens.detail import DetailScreen

PREFIX = f"tm{uuid.uuid4().hex[:6]}"
BASE = f"{PREFIX}-base"  # sends to the base model only
DROP = f"{PREFIX}-drop"  # served by an adapter dropped for it
SIZE = (160, 45)
PROMPT_TEXT = "telemetry-probe-words"


@dataclass
class Sent:
    key: str
    key_id: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (version, status)

    def add(self, version: str, status: int, usage: Any = None) -> None:
        self.requests += 1
        self.statuses[(version, status)] += 1
        if usage is not None:
            self.prompt_tokens += usage.prompt_tokens
            self.completion_tokens += usage.completion_tokens


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def settle(condition: Callable[[], object], timeout_s: float = 10) -> None:
    """Wait a little for `condition`, without failing: the tests say what is wrong if it never is."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)


def admin(server: Any) -> AdminClient:
    return AdminClient(server.demo.dir / "state" / "admin.sock")


def drop_adapter(server: Any, tenant: str, version: str, source: str) -> None:
    """Stage under a dot name, then rename into place (as operators are told to)."""
    staged = server.demo.dir / "adapters" / tenant / f".{version}.tmp"
    shutil.copytree(server.demo.adapter_dir(source), staged)
    staged.rename(staged.with_name(version))


def tenant_row(server: Any, name: str) -> dict[str, Any]:
    rows = admin(server).call("GET", "/admin/tenants")["tenants"]
    return next(row for row in rows if row["name"] == name)


@pytest.fixture(scope="module")
def sent(server: Any) -> dict[str, Sent]:
    with Store.open(server.demo.database) as store:
        issued = {}
        for name in (BASE, DROP):
            store.add_tenant(name, allow_base_model=name == BASE)
            issued[name] = store.issue_key(name)
    drop_adapter(server, DROP, "v1", "acme")
    wait_for(lambda: tenant_row(server, DROP)["active_version"] == "v1", "the dropped adapter to serve")
    sent = {name: Sent(key.plaintext, key.key_id) for name, key in issued.items()}

    base = OpenAI(base_url=server.base_url, api_key=sent[BASE].key, max_retries=0)
    for max_tokens in (3, 5, 7):
        reply = base.chat.completions.create(
            model=DEMO_MODEL_NAME, messages=[{"role": "user", "content": PROMPT_TEXT}], max_tokens=max_tokens
        )
        sent[BASE].add("", 200, reply.usage)

    drop = OpenAI(base_url=server.base_url, api_key=sent[DROP].key, max_retries=0)
    for max_tokens in (4, 6, 8):
        reply = drop.completions.create(model=DROP, prompt=PROMPT_TEXT, max_tokens=max_tokens)
        sent[DROP].add("v1", 200, reply.usage)
    chunks = list(
        drop.chat.completions.create(
            model=DROP,
            messages=[{"role": "user", "content": PROMPT_TEXT}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    sent[DROP].add("v1", 200, chunks[-1].usage)
    with pytest.raises(NotFoundError):
        drop.completions.create(model="acme", prompt=PROMPT_TEXT, max_tokens=2)  # another tenant's
    sent[DROP].add("", 404)

    # Every request's record is published before its response ends; a stream's just after.
    settle(lambda: tenant_row(server, DROP)["stats"]["requests"] == sent[DROP].requests)
    return sent


def test_admin_tenants_and_detail_count_exactly_what_was_sent(server: Any, sent: dict[str, Sent]) -> None:
    for name, what in sent.items():
        stats = tenant_row(server, name)["stats"]
        assert (stats["requests"], stats["prompt_tokens"], stats["completion_tokens"]) == (
            what.requests,
            what.prompt_tokens,
            what.completion_tokens,
        ), name
        assert stats["errors"] == {}
        assert stats["rejected"] == 0
        assert stats["e2e_ms"]["p50"] > 0
        assert (stats["running"], stats["queued"]) == (0, 0)
    assert tenant_row(server, DROP)["stats"]["client_errors"] == {"404": 1}
    assert tenant_row(server, BASE)["stats"]["client_errors"] == {}

    detail = admin(server).call("GET", f"/admin/tenants/{DROP}")
    (v1,) = detail["versions"]
    assert (v1["version"], v1["active"], v1["tier"], v1["requests"], v1["errors"]) == (
        "v1",
        True,
        "gpu",
        4,
        0,
    )
    assert v1["ttft_ms"]["p50"] > 0
    assert len(detail["recent"]) == sent[DROP].requests
    assert sum(r["completion_tokens"] for r in detail["recent"]) == sent[DROP].completion_tokens
    assert [k["key_id"] for k in detail["keys"]] == [sent[DROP].key_id]
    assert sent[DROP].key not in json.dumps(detail), "no key in the admin payloads"
    assert PROMPT_TEXT not in json.dumps(detail), "no prompt either"


def metric_values(server: Any) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(server.local.metrics_url, timeout=30) as response:  # noqa: S310 (loopback)
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, values


def test_metrics_count_exactly_what_was_sent(server: Any, sent: dict[str, Sent]) -> None:
    text, values = metric_values(server)
    for name, what in sent.items():
        counted = {
            (dict(labels)["version"], int(dict(labels)["status"])): value
            for (metric, labels), value in values.items()
            if metric == "lorabox_requests_total" and dict(labels)["tenant"] == name
        }
        assert counted == dict(what.statuses), name
        for metric, expected in (
            ("lorabox_prompt_tokens_total", what.prompt_tokens),
            ("lorabox_completion_tokens_total", what.completion_tokens),
        ):
            total = sum(
                v for (m, labels), v in values.items() if m == metric and dict(labels)["tenant"] == name
            )
            assert total == expected, (name, metric)
    latency = ("lorabox_request_duration_seconds_count", (("tenant", DROP), ("version", "v1")))
    assert values[latency] == 4
    for what in sent.values():
        assert what.key not in text
        assert what.key_id not in text
    assert PROMPT_TEXT not in text


def test_status_json_counts_exactly_what_was_sent(
    server: Any, sent: dict[str, Sent], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--json", "--config", str(server.demo.config)]) == 0
    shown = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row["stats"] for row in shown["tenants"]}
    for name, what in sent.items():
        assert (rows[name]["requests"], rows[name]["prompt_tokens"], rows[name]["completion_tokens"]) == (
            what.requests,
            what.prompt_tokens,
            what.completion_tokens,
        )
    assert shown["status"]["state"] == "ready"
    assert shown["status"]["totals"]["requests"] >= sum(w.requests for w in sent.values())

    assert main(["status", "--config", str(server.demo.config)]) == 0
    text = capsys.readouterr().out
    line = next(row for row in text.splitlines() if row.startswith(DROP))
    assert line.split()[1:6] == [
        "v1",
        "gpu",
        "5",
        str(sent[DROP].prompt_tokens),
        str(sent[DROP].completion_tokens),
    ]

    assert main(["ps", "--json", "--config", str(server.demo.config)]) == 0
    adapters = json.loads(capsys.readouterr().out)["adapters"]
    (mine,) = [a for a in adapters if a["tenant"] == DROP]
    size = sum(p.stat().st_size for p in server.demo.adapter_dir("acme").iterdir())
    assert (mine["version"], mine["tier"], mine["running"]) == ("v1", "gpu", 0)
    assert 0 < mine["size_bytes"] <= size
    assert mine["idle_since"] is not None


def test_reading_telemetry_does_not_stall_the_event_loop(server: Any, sent: dict[str, Sent]) -> None:
    client = admin(server)
    with no_loop_stall(server.demo):
        for _ in range(10):
            client.call("GET", "/admin/status")
            client.call("GET", "/admin/tenants")
            client.call("GET", f"/admin/tenants/{DROP}")
            metric_values(server)


def test_device_reads_as_the_machine_is(server: Any) -> None:
    status = admin(server).call("GET", "/admin/status")
    try:
        pynvml.nvmlInit()
        has_nvml = True
    except pynvml.NVMLError:
        has_nvml = False
    device = status["device"]
    assert device["kind"] == ("gpu" if has_nvml else "cpu")
    if not has_nvml:  # this machine: NVML absent, the box says "CPU only" and goes on
        assert device["gpus"] == []
        assert device["vram_split"] is None
    assert device["host"]["memory_total"] > device["host"]["memory_used"] > 0
    assert device["host"]["cpus"] >= 1
    engine = status["engine_stats"]
    assert engine["kv_cache_usage"] is not None
    assert engine["memory"]["kv_cache"] == 1 << 30  # the test server's VLLM_CPU_KVCACHE_SPACE
    assert engine["memory"]["weights"] > 0


def test_payloads_have_the_shapes_of_the_contract(server: Any, sent: dict[str, Sent]) -> None:
    """Every field of docs/admin-api.md's examples (tests/fixtures/admin) is served, as null at
    worst, with the example's type."""
    fixtures = Path(__file__).parent / "fixtures" / "admin"
    example = json.loads((fixtures / "status_cpu.json").read_text())
    assert_shape(example, admin(server).call("GET", "/admin/status"), "status")
    row = json.loads((fixtures / "tenants.json").read_text())["tenants"][0]
    assert_shape(row, tenant_row(server, DROP), "tenant")
    detail = json.loads((fixtures / "tenant_acme.json").read_text())
    assert_shape(detail, admin(server).call("GET", f"/admin/tenants/{DROP}"), "detail")


def assert_shape(example: Any, served: Any, where: str) -> None:
    if served is None or example is None:
        return  # a value the box cannot know is null
    if isinstance(example, dict):
        assert isinstance(served, dict), where
        for key, value in example.items():
            assert key in served, f"{where}.{key} is missing"
            if key not in ("errors", "client_errors", "policy"):  # keys of these vary
                assert_shape(value, served[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(served, list), where
        for item in served[:1]:
            if example:
                assert_shape(example[0], item, f"{where}[0]")
    elif isinstance(example, int | float) and not isinstance(example, bool):
        assert isinstance(served, int | float), where
        assert not isinstance(served, bool), where
    else:
        assert type(served) is type(example), where


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/status"),
        ("GET", "/admin/tenants"),
        ("GET", f"/admin/tenants/{DROP}"),
        ("GET", "/admin/stream"),
        ("GET", "/admin/events"),
        ("POST", f"/admin/tenants/{DROP}/activate"),
        ("POST", "/admin/keys/KEYID/revoke"),
    ],
)
def test_admin_endpoints_are_not_on_the_api_port_whatever_the_key(
    server: Any, sent: dict[str, Sent], method: str, path: str
) -> None:
    path = path.replace("KEYID", sent[DROP].key_id)
    for key in (None, sent[DROP].key, server.demo.keys["acme"]):
        request = urllib.request.Request(  # noqa: S310 (loopback)
            server.url + path, method=method, data=b"{}" if method == "POST" else None
        )
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310
        assert refused.value.code in (404, 405), (path, key)
        assert "error" in json.loads(refused.value.read())
    # Nothing happened: the key still works.
    drop = OpenAI(base_url=server.base_url, api_key=sent[DROP].key, max_retries=0)
    assert drop.models.list().data


async def test_stream_sends_stats_at_once_then_events_as_they_happen(
    server: Any, sent: dict[str, Sent]
) -> None:
    client = admin(server)
    stream = client.stream("/admin/stream?interval=0.5", idle_timeout_s=10)
    seen: list[Any] = []
    async with asyncio.timeout(30):
        async for event in stream:
            seen.append(event)
            if event.event == "stats" and sum(e.event == "stats" for e in seen) == 1:
                tick = event.json()
                assert {row["name"] for row in tick["tenants"]} >= {BASE, DROP}
                assert tick["status"]["state"] == "ready"
                with Store.open(server.demo.database) as store:  # as `lorabox key issue` does
                    store.issue_key(BASE)
            if event.event == "event" and event.json()["kind"] == "key_issued":
                assert event.json()["tenant"] == BASE
                break
    assert sum(e.event == "stats" for e in seen) >= 1
    await stream.aclose()


async def test_tui_against_the_live_daemon_shows_the_counts_and_a_drop(
    server: Any, sent: dict[str, Sent]
) -> None:
    app = LoraboxApp(admin(server), backoff=Backoff(0.05, 0.5))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: {BASE, DROP} <= set(app.tenants), "the fresh tenants", timeout_s=30)
        for name, what in sent.items():
            stats = app.tenants[name].stats
            assert (stats.requests, stats.prompt_tokens, stats.completion_tokens) == (
                what.requests,
                what.prompt_tokens,
                what.completion_tokens,
            )
        table = app.main.table
        assert {BASE, DROP} <= set(table.shown)
        assert table.get_cell(DROP, "version").plain == "v1"
        assert table.get_cell(DROP, "tier").plain == "gpu"
        assert table.get_cell(DROP, "4xx").plain == "1"
        assert table.get_cell(BASE, "4xx").plain == "0"

        table.move_cursor(row=table.shown.index(DROP))
        await pilot.press("enter")
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        await until(pilot, lambda: screen.detail is not None, "the tenant's detail")
        versions = screen.query_one("#versions", DataTable)
        assert [cell.plain for cell in versions.get_row_at(0)][:1] == ["v1"]
        assert versions.get_row_at(0)[8].plain == "4"  # requests served by v1
        recent = screen.query_one("#recent", DataTable)
        assert recent.row_count == sent[DROP].requests
        assert sum(int(recent.get_row_at(i)[6].plain) for i in range(recent.row_count)) == (
            sent[DROP].completion_tokens
        )
        await pilot.press("escape")

        # A new version dropped into the folder shows in the event pane as the daemon takes it.
        drop_adapter(server, DROP, "v2", "globex")
        await until(
            pilot,
            lambda: any("adapter_registered" in s and f"{DROP}@v2" in s for s in event_lines(app)),
            "the drop in the event pane",
            timeout_s=60,
        )
        await until(pilot, lambda: table.get_cell(DROP, "version").plain == "v2", "the new version", 60)
