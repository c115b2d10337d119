"""/metrics' text: exact names and labels, counters from the traffic statistics, N/A left out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from appliance.telemetry.metrics import MetricsSnapshot, render
from appliance.telemetry.stats import TrafficStats
from tests.test_telemetry_stats import record

FIXTURES = Path(__file__).parent / "fixtures" / "admin"


def status(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return loaded


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def traffic() -> TrafficStats:
    stats = TrafficStats()
    for _ in range(3):
        stats.record(record(prompt=7, completion=11, latency=300.0, ttft=30.0))
    stats.record(record(status=429, prompt=0, completion=0, ttft=None, admitted=False))
    stats.record(record(tenant="globex", version="v2", status=500, prompt=4, completion=1))
    return stats


def test_request_counter_is_named_and_labelled_as_dashboards_expect() -> None:
    text = render(MetricsSnapshot.take(traffic(), status("status_cpu.json"), [("acme", 2, 1, 6, 40)]))
    found = samples(text)
    labels = lambda **kw: tuple(sorted(kw.items()))  # noqa: E731
    assert found[("lorabox_requests_total", labels(tenant="acme", version="v1", status="200"))] == 3
    assert found[("lorabox_requests_total", labels(tenant="acme", version="v1", status="429"))] == 1
    assert found[("lorabox_requests_total", labels(tenant="globex", version="v2", status="500"))] == 1
    assert found[("lorabox_prompt_tokens_total", labels(tenant="acme", version="v1"))] == 21
    assert found[("lorabox_completion_tokens_total", labels(tenant="acme", version="v1"))] == 33
    duration = labels(tenant="acme", version="v1")
    assert found[("lorabox_request_duration_seconds_count", duration)] == 3, "the 429 has no latency"
    bucket = "lorabox_request_duration_seconds_bucket"
    assert found[(bucket, labels(tenant="acme", version="v1", le="0.25"))] == 0
    assert found[(bucket, labels(tenant="acme", version="v1", le="0.5"))] == 3
    assert (bucket, labels(tenant="acme", version="", le="0.5")) not in found
    assert abs(found[("lorabox_time_to_first_token_seconds_sum", duration)] - 0.09) < 1e-9
    assert found[("lorabox_tenant_requests_running", labels(tenant="acme"))] == 2
    assert found[("lorabox_tenant_requests_queued", labels(tenant="acme"))] == 1
    assert found[("lorabox_tenant_background_running", labels(tenant="acme"))] == 6
    assert found[("lorabox_tenant_background_queued", labels(tenant="acme"))] == 40
    assert b"SECRET-KEY-ID" not in text


def test_box_engine_and_gpu_gauges_come_from_the_status_payload() -> None:
    found = samples(render(MetricsSnapshot.take(TrafficStats(), status("status_gpu.json"), [])))
    gpu = (("gpu", "0"),)
    assert found[("lorabox_gpu_memory_total_bytes", gpu)] == 25757220864
    assert found[("lorabox_gpu_utilization_ratio", gpu)] == 0.87
    assert found[("lorabox_gpu_power_limit_watts", gpu)] == 450.0
    assert found[("lorabox_gpu_process_memory_bytes", gpu)] == 20937965568
    assert found[("lorabox_gpu_info", (("gpu", "0"), ("name", "NVIDIA GeForce RTX 4090")))] == 1
    assert found[("lorabox_vram_bytes", (("use", "kv_cache"),))] == 3221225472
    assert found[("lorabox_engine_requests_waiting", ())] == 3
    assert found[("lorabox_engine_kv_cache_usage_ratio", ())] == 0.31
    assert found[("lorabox_adapters", (("tier", "disk"),))] == 1
    assert found[("lorabox_ready", ())] == 1
    assert found[("lorabox_info", (("engine", "vllm"), ("model", "lorabox-demo"), ("version", "0.1.0")))] == 1
    assert found[("lorabox_host_cpu_utilization_ratio", ())] == 0.35


def test_unknown_values_are_left_out_not_zero() -> None:
    cpu = status("status_cpu.json")
    cpu["engine_stats"] = None  # not ready yet
    cpu["ready"] = False
    cpu["device"]["host"]["cpu_pct"] = None
    names = {name for name, _ in samples(render(MetricsSnapshot.take(TrafficStats(), cpu, [])))}
    assert not {n for n in names if n.startswith("lorabox_gpu_") or n.startswith("lorabox_vram")}
    assert "lorabox_engine_requests_running" not in names
    assert "lorabox_host_cpu_utilization_ratio" not in names
    assert "lorabox_host_memory_total_bytes" in names
    assert samples(render(MetricsSnapshot.take(TrafficStats(), cpu, [])))[("lorabox_ready", ())] == 0


def test_the_usage_ledger_families_come_from_the_status_payload() -> None:
    payload = status("status_cpu.json") | {
        "ledger": {
            "pending_rows": 2,
            "spooled_rows": 7,
            "write_failures": {"database": 5, "spool": 1},
            "dropped_rows": 0,
            "unavailable": None,
            "spool_dir": "/var/lib/lorabox/spool",
        }
    }
    found = samples(render(MetricsSnapshot.take(TrafficStats(), payload, [])))
    assert found[("lorabox_usage_pending_rows", ())] == 2
    assert found[("lorabox_usage_spooled_rows", ())] == 7
    assert found[("lorabox_usage_write_failures_total", (("target", "database"),))] == 5
    assert found[("lorabox_usage_write_failures_total", (("target", "spool"),))] == 1
    assert found[("lorabox_usage_rows_dropped_total", ())] == 0
    assert "/var/lib" not in render(MetricsSnapshot.take(TrafficStats(), payload, [])).decode()
