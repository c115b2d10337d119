"""Prometheus exposition of lorabox's telemetry (prometheus_client, in a registry of its own).

Nothing is updated per request: `MetricsSnapshot` copies the counters (on the event loop, where
they change) and the status payload of the admin API, and `render` turns that copy into the text
format on any thread. Unknown values (no GPU, NVML failing, the engine not ready) are left out, as
Prometheus expects, rather than shown as zero. Labels are tenant and adapter version names, HTTP
statuses, GPU indexes: never a key, a prompt or a completion. Every metric is listed in the README.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .stats import LATENCY_BUCKETS_S, Histogram, TrafficStats

GPU_GAUGES = (
    ("memory_total", "lorabox_gpu_memory_total_bytes", "GPU memory, in bytes.", 1),
    ("memory_used", "lorabox_gpu_memory_used_bytes", "GPU memory in use (all processes), in bytes.", 1),
    ("process_memory", "lorabox_gpu_process_memory_bytes", "GPU memory of lorabox and its engine.", 1),
    ("utilization_pct", "lorabox_gpu_utilization_ratio", "GPU busy time over NVML's last sample, 0-1.", 100),
    ("temperature_c", "lorabox_gpu_temperature_celsius", "GPU temperature.", 1),
    ("power_w", "lorabox_gpu_power_watts", "GPU power draw.", 1),
    ("power_limit_w", "lorabox_gpu_power_limit_watts", "GPU power limit in force.", 1),
)
HOST_GAUGES = (
    ("memory_total", "lorabox_host_memory_total_bytes", "Host memory, in bytes.", 1),
    ("memory_used", "lorabox_host_memory_used_bytes", "Host memory not available to new work, in bytes.", 1),
    ("cpu_pct", "lorabox_host_cpu_utilization_ratio", "Host CPU use over all cores, 0-1.", 100),
    ("cpus", "lorabox_host_cpus", "CPU cores of the host.", 1),
)
ENGINE_GAUGES = (
    ("running", "lorabox_engine_requests_running", "Requests the engine is generating for."),
    ("waiting", "lorabox_engine_requests_waiting", "Requests waiting inside the engine (batch or slot)."),
    ("kv_cache_usage", "lorabox_engine_kv_cache_usage_ratio", "Fraction of the KV cache in use, 0-1."),
    ("gpu_slots", "lorabox_engine_adapter_slots", "Adapters one batch may use at once (GPU slots)."),
)


@dataclass(frozen=True)
class SeriesCounts:
    """One (tenant, adapter version) series' counters, copied."""

    tenant: str
    version: str
    statuses: dict[int, int]
    prompt_tokens: int
    completion_tokens: int
    ttft: tuple[list[int], float]  # cumulative bucket counts, sum (seconds)
    e2e: tuple[list[int], float]


@dataclass(frozen=True)
class MetricsSnapshot:
    series: list[SeriesCounts]
    status: Mapping[str, Any]
    """`GET /admin/status`'s payload."""
    tenants: list[tuple[str, int, int, int, int]]
    """(tenant, running, queued, background running, background queued): the interactive requests
    and, apart, the background band's (batch lines, flex requests)."""
    throttled: Mapping[str, int] = field(default_factory=dict)
    """Requests admitted while their tenant was past its quota and throttled, per tenant."""
    guardrails: dict[tuple[str, str], int] = field(default_factory=dict)
    """Requests a guardrail acted on, per (tenant, guardrail)."""

    @classmethod
    def take(
        cls,
        traffic: TrafficStats,
        status: Mapping[str, Any],
        tenants: list[tuple[str, int, int, int, int]],
        throttled: Mapping[str, int] | None = None,
    ) -> MetricsSnapshot:
        """Copies the counters; call on the event loop (where they change)."""

        def copy(histogram: Histogram) -> tuple[list[int], float]:
            return histogram.cumulative(), histogram.total

        series = [
            SeriesCounts(
                tenant,
                version,
                dict(counts.statuses),
                counts.prompt_tokens,
                counts.completion_tokens,
                copy(counts.ttft_histogram),
                copy(counts.e2e_histogram),
            )
            for tenant, version, counts in traffic.series()
        ]
        return cls(series, status, tenants, dict(throttled or {}), dict(traffic.guardrails))


def _histogram(name: str, doc: str, series: list[SeriesCounts], pick: str) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["tenant", "version"])
    bounds = [str(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
    for s in series:
        cumulative, total = getattr(s, pick)
        if cumulative[-1]:  # a series that never reached generation has no latency to show
            family.add_metric([s.tenant, s.version], list(zip(bounds, cumulative, strict=True)), total)
    return family


def _gauge(name: str, doc: str, value: Any, scale: float = 1) -> Iterator[GaugeMetricFamily]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        yield GaugeMetricFamily(name, doc, value=value / scale)


class _Collector(Collector):
    def __init__(self, snapshot: MetricsSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._traffic()
        yield from self._box()
        yield from self._ledger()
        yield from self._device()

    def _traffic(self) -> Iterator[Metric]:
        series = self.snapshot.series
        requests = CounterMetricFamily(
            "lorabox_requests_total",
            "Requests that got past authentication, by tenant, adapter version and HTTP status.",
            labels=["tenant", "version", "status"],
        )
        prompt = CounterMetricFamily(
            "lorabox_prompt_tokens_total",
            "Prompt tokens, by tenant and adapter version.",
            labels=["tenant", "version"],
        )
        completion = CounterMetricFamily(
            "lorabox_completion_tokens_total",
            "Completion tokens generated, by tenant and adapter version.",
            labels=["tenant", "version"],
        )
        for s in series:
            for status, count in sorted(s.statuses.items()):
                requests.add_metric([s.tenant, s.version, str(status)], count)
            prompt.add_metric([s.tenant, s.version], s.prompt_tokens)
            completion.add_metric([s.tenant, s.version], s.completion_tokens)
        yield from (requests, prompt, completion)
        yield _histogram(
            "lorabox_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (requests that reached generation).",
            series,
            "ttft",
        )
        yield _histogram(
            "lorabox_request_duration_seconds",
            "From a request's arrival to its end (requests that reached generation).",
            series,
            "e2e",
        )
        running = GaugeMetricFamily(
            "lorabox_tenant_requests_running", "Requests running, by tenant.", labels=["tenant"]
        )
        queued = GaugeMetricFamily(
            "lorabox_tenant_requests_queued", "Requests queued, by tenant.", labels=["tenant"]
        )
        band_running = GaugeMetricFamily(
            "lorabox_tenant_background_running",
            "Background requests running (batch lines, flex requests), by tenant.",
            labels=["tenant"],
        )
        band_queued = GaugeMetricFamily(
            "lorabox_tenant_background_queued",
            "Background requests waiting for a place in the band, by tenant.",
            labels=["tenant"],
        )
        for tenant, *now in self.snapshot.tenants:
            for family, value in zip((running, queued, band_running, band_queued), now, strict=True):
                family.add_metric([tenant], value)
        throttled = CounterMetricFamily(
            "lorabox_quota_throttled_requests",
            "Requests served while their tenant was past its quota (quota_action = throttle), by tenant.",
            labels=["tenant"],
        )
        for tenant, count in sorted(self.snapshot.throttled.items()):
            throttled.add_metric([tenant], count)
        yield from (running, queued, band_running, band_queued, throttled)
        guardrails = CounterMetricFamily(
            "lorabox_guardrail_actions",
            "Requests a tenant's guardrail acted on, by tenant and kind (deny_input: refused; "
            "deny_output: cut, finish_reason content_filter; redact_output: text redacted).",
            labels=["tenant", "kind"],
        )
        for (tenant, kind), count in sorted(self.snapshot.guardrails.items()):
            guardrails.add_metric([tenant, kind], count)
        yield guardrails

    def _box(self) -> Iterator[Metric]:
        status = self.snapshot.status
        info = InfoMetricFamily("lorabox", "The lorabox build and what it serves.")
        info.add_metric(
            [],
            {
                "version": str(status.get("version") or ""),
                "engine": str(status.get("engine") or ""),
                "model": str(status.get("model") or ""),
            },
        )
        yield info
        yield GaugeMetricFamily(
            "lorabox_ready", "1 while the box serves requests, else 0.", value=int(bool(status.get("ready")))
        )
        yield from _gauge(
            "lorabox_uptime_seconds", "Seconds since the daemon started.", status.get("uptime_s")
        )
        engine = status.get("engine_stats") or {}
        for key, name, doc in ENGINE_GAUGES:
            yield from _gauge(name, doc, engine.get(key))
        adapters = GaugeMetricFamily(
            "lorabox_adapters",
            "Ready adapter versions, by where they live (gpu, cpu, disk).",
            labels=["tier"],
        )
        for tier, count in (status.get("adapters") or {}).items():
            adapters.add_metric([tier], count)
        yield adapters
        lag = status.get("loop_lag") or {}
        yield CounterMetricFamily(
            "lorabox_event_loop_stalls_total",
            "Times the event loop ran more than its stall threshold late.",
            value=lag.get("stalls", 0),
        )
        yield from _gauge(
            "lorabox_event_loop_lag_max_seconds",
            "Worst event-loop lateness since start.",
            lag.get("max_ms"),
            1000,
        )

    def _ledger(self) -> Iterator[Metric]:
        ledger = self.snapshot.status.get("ledger") or {}
        yield from _gauge(
            "lorabox_usage_pending_rows",
            "Usage rows booked and not yet durable (waiting for a write, or kept after a failed one).",
            ledger.get("pending_rows"),
        )
        yield from _gauge(
            "lorabox_usage_spooled_rows",
            "Usage rows in the spool, not yet replayed into the database.",
            ledger.get("spooled_rows"),
        )
        failures = CounterMetricFamily(
            "lorabox_usage_write_failures",
            "Usage writes that failed, by target: database (then spooled), spool (then kept in memory).",
            labels=["target"],
        )
        for target, count in sorted((ledger.get("write_failures") or {}).items()):
            failures.add_metric([target], count)
        yield failures
        if isinstance(ledger.get("dropped_rows"), int):
            yield CounterMetricFamily(
                "lorabox_usage_rows_dropped",
                "Usage rows refused because too many were waiting (their responses ended 503).",
                value=ledger["dropped_rows"],
            )

    def _device(self) -> Iterator[Metric]:
        device = self.snapshot.status.get("device") or {}
        gpus = device.get("gpus") or []
        names = GaugeMetricFamily(
            "lorabox_gpu_info", "GPUs by index, with their names.", labels=["gpu", "name"]
        )
        for gpu in gpus:
            names.add_metric([str(gpu["index"]), str(gpu.get("name") or "")], 1)
        yield names
        for key, name, doc, scale in GPU_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["gpu"])
            for gpu in gpus:
                if isinstance(gpu.get(key), int | float):
                    family.add_metric([str(gpu["index"])], gpu[key] / scale)
            yield family
        split = GaugeMetricFamily(
            "lorabox_vram_bytes",
            "GPU 0's memory by use (base_weights, kv_cache, adapter_slots, other), as the engine reports it.",
            labels=["use"],
        )
        for use, value in (device.get("vram_split") or {}).items():
            if isinstance(value, int | float):
                split.add_metric([use], value)
        yield split
        host = device.get("host") or {}
        for key, name, doc, scale in HOST_GAUGES:
            yield from _gauge(name, doc, host.get(key), scale)


def render(snapshot: MetricsSnapshot) -> bytes:
    """The Prometheus text format (0.0.4) of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))
    return generate_latest(registry)
