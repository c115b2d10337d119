"""Traffic statistics from request records: counts, percentiles, rates and history (a fake clock)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from appliance.telemetry import stats as stats_module
from appliance.telemetry.stats import LATENCY_WINDOW_S, SAMPLES, TrafficStats, percentile
from appliance.tenancy.ledger import RequestRecord


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(
    tenant: str = "acme",
    version: str = "v1",
    status: int = 200,
    prompt: int = 10,
    completion: int = 20,
    ttft: float | None = 40.0,
    latency: float = 400.0,
    admitted: bool = True,
) -> RequestRecord:
    return RequestRecord(
        tenant=tenant,
        key_id="SECRET-KEY-ID",
        model=tenant,
        adapter_version=version,
        endpoint="chat",
        engine="vllm",
        status=status,
        finish_reason="stop",
        prompt_tokens=prompt,
        completion_tokens=completion,
        ttft_ms=ttft,
        latency_ms=latency,
        admitted=admitted,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def traffic(clock: Clock) -> TrafficStats:
    return TrafficStats(clock)


def test_counts_per_tenant_and_version(traffic: TrafficStats) -> None:
    for _ in range(3):
        traffic.record(record(prompt=7, completion=11))
    traffic.record(record(version="v2", prompt=5, completion=2))
    traffic.record(record(version="", status=404, prompt=0, completion=0, ttft=None, admitted=False))
    traffic.record(record(tenant="globex", prompt=100, completion=1))
    acme = traffic.tenant("acme")
    assert (acme["requests"], acme["prompt_tokens"], acme["completion_tokens"]) == (5, 26, 35)
    assert traffic.version("acme", "v1")["requests"] == 3
    assert traffic.version("acme", "v2")["requests"] == 1
    assert traffic.version("acme", "")["requests"] == 1
    assert traffic.version("acme", "v9") == traffic.version("nobody", "v1")  # zeros, no percentiles
    assert traffic.tenant("globex")["prompt_tokens"] == 100
    totals = traffic.totals()
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (6, 126, 36)


def test_statuses_are_sorted_into_errors_client_errors_and_rejections(traffic: TrafficStats) -> None:
    for status in (200, 200, 400, 404, 404, 429, 429, 429, 499, 500, 503, 503):
        traffic.record(record(status=status))
    acme = traffic.tenant("acme")
    assert acme["errors"] == {"500": 1, "503": 2}
    assert acme["client_errors"] == {"400": 1, "404": 2, "499": 1}
    assert acme["rejected"] == 3
    assert traffic.version("acme", "v1")["errors"] == 3


def test_percentiles_are_nearest_rank_over_admitted_requests_only(traffic: TrafficStats) -> None:
    for latency in range(1, 101):  # 1..100 ms
        traffic.record(record(latency=float(latency), ttft=float(latency) / 10))
    traffic.record(record(latency=99999.0, ttft=None, status=404, admitted=False))  # a refusal: no latency
    acme = traffic.tenant("acme")
    assert acme["e2e_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert acme["ttft_ms"] == {"p50": 5.0, "p95": 9.5, "p99": 9.9}
    assert percentile([3.0], 0.99) == 3.0


def test_no_traffic_reads_as_zeros_and_nulls(traffic: TrafficStats) -> None:
    quiet = traffic.tenant("quiet")
    assert quiet["requests"] == 0
    assert quiet["e2e_ms"] == {"p50": None, "p95": None, "p99": None}
    assert quiet["rps_10s"] == 0.0
    assert quiet["history"]["rps"] == []


def test_a_request_without_a_first_token_has_no_ttft_sample(traffic: TrafficStats) -> None:
    traffic.record(record(ttft=None, latency=5.0, status=503))
    acme = traffic.tenant("acme")
    assert acme["ttft_ms"]["p50"] is None
    assert acme["e2e_ms"]["p50"] == 5.0


def test_latency_window_forgets_old_samples(traffic: TrafficStats, clock: Clock) -> None:
    traffic.record(record(latency=900.0))
    clock.now += LATENCY_WINDOW_S - 10
    traffic.record(record(latency=100.0))
    assert traffic.tenant("acme")["e2e_ms"]["p99"] == 900.0
    clock.now += 20  # the first sample is now older than the window
    assert traffic.tenant("acme")["e2e_ms"] == {"p50": 100.0, "p95": 100.0, "p99": 100.0}
    clock.now += LATENCY_WINDOW_S
    assert traffic.tenant("acme")["e2e_ms"]["p50"] is None
    assert traffic.tenant("acme")["requests"] == 2, "counters are totals, not windows"


def test_latency_samples_are_bounded(traffic: TrafficStats) -> None:
    for _ in range(SAMPLES):
        traffic.record(record(latency=1000.0))
    for _ in range(SAMPLES):
        traffic.record(record(latency=10.0))  # the ring now holds only these
    assert traffic.tenant("acme")["e2e_ms"]["p99"] == 10.0


def test_rates_count_whole_seconds_of_the_last_10_and_60(traffic: TrafficStats, clock: Clock) -> None:
    clock.now = 1000.5
    for _ in range(20):
        traffic.record(record(completion=5))
    assert traffic.tenant("acme")["rps_10s"] == 0.0, "the current second is not over yet"
    clock.now = 1001.2
    acme = traffic.tenant("acme")
    assert (acme["rps_10s"], acme["tps_10s"]) == (2.0, 10.0)
    assert (acme["rps_60s"], acme["tps_60s"]) == (round(20 / 60, 2), round(100 / 60, 2))
    clock.now = 1011.2  # 10 s later: out of the 10 s window, still in the 60 s one
    acme = traffic.tenant("acme")
    assert acme["rps_10s"] == 0.0
    assert acme["rps_60s"] == round(20 / 60, 2)
    assert traffic.totals()["rps_10s"] == 0.0


def test_history_grows_one_point_per_interval_up_to_its_length(traffic: TrafficStats, clock: Clock) -> None:
    clock.now = 1000.0
    traffic.record(record())
    lengths = []
    for _ in range(5):
        clock.now += 2
        traffic.record(record())
        lengths.append(len(traffic.tenant("acme")["history"]["rps"]))
    assert lengths == [1, 2, 3, 4, 5]
    history = traffic.tenant("acme")["history"]
    assert history["interval_s"] == 2.0
    assert history["rps"] == [0.5] * 5
    assert history["tps"] == [10.0] * 5
    clock.now += 10_000  # long idle: the history is full length, all zeros
    assert traffic.tenant("acme")["history"]["rps"] == [0.0] * stats_module.HISTORY_POINTS


def test_recent_requests_are_newest_first_and_hold_no_key(traffic: TrafficStats) -> None:
    for completion in range(25):
        traffic.record(record(completion=completion))
    recent = traffic.recent("acme")
    assert len(recent) == stats_module.RECENT
    assert [r["completion_tokens"] for r in recent[:3]] == [24, 23, 22]
    assert "SECRET-KEY-ID" not in repr(recent)
    assert "key_id" not in recent[0]
    assert traffic.recent("nobody") == []


def test_snapshots_never_mention_the_key(traffic: TrafficStats) -> None:
    traffic.record(record())
    seen = repr(traffic.tenant("acme")) + repr(traffic.totals()) + repr(traffic.version("acme", "v1"))
    assert "SECRET-KEY-ID" not in seen
    assert {f.name for f in fields(RequestRecord)} >= {"key_id"}  # the record has one; we drop it
