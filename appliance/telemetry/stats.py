"""Traffic statistics per tenant and per adapter version, from each request's `RequestRecord`.

`TrafficStats.record` is a sink of `Services.publish`: it runs on the event loop once per request,
so it does O(1) work and takes no lock: a few counters, one per-second bucket, one slot of a ring
of latency samples, one Prometheus bucket. Everything costly (percentiles, rates, history) is
computed when somebody reads (the admin API, /metrics, the TUI every 2 s), and a series that has
not changed is not computed again.

What is counted, and how:
- every request that got past authentication, whatever its status: `requests`, tokens, statuses;
- latency (time to first token, end to end) of the requests that reached generation only: a
  refusal answered in a millisecond is not a latency of serving;
- percentiles over the last `LATENCY_WINDOW_S` (at most `SAMPLES` per series), rates over the
  last 10 and 60 whole seconds, a history of one point per `HISTORY_INTERVAL_S`;
- `tps` counts completion tokens (the tokens generated), at the second the request ended.
No prompt, no completion and no key is kept: a record's key id is never read here.
"""

from __future__ import annotations

import bisect
import math
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..tenancy.ledger import RequestRecord

LATENCY_WINDOW_S = 300.0
SAMPLES = 1024
"""Latency samples kept per series: bounds memory (24 KiB) and the sort behind a percentile."""
HISTORY_INTERVAL_S = 2
HISTORY_POINTS = 60
RATE_WINDOWS_S = (10, 60)
RING_SECONDS = HISTORY_INTERVAL_S * HISTORY_POINTS + HISTORY_INTERVAL_S + 2
RECENT = 20
RECOMPUTE_S = 5.0
"""How long a series' percentiles are reused once none of its samples has been added since."""
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds of the Prometheus histograms' buckets (seconds), for TTFT and end-to-end latency."""
RATE_LIMITED = 429


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty list."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Histogram:
    """Cumulative Prometheus buckets: `counts[i]` observations <= LATENCY_BUCKETS_S[i], last: +Inf."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[int]:
        running, out = 0, []
        for count in self.counts:
            running += count
            out.append(running)
        return out


class LatencyWindow:
    """The latest SAMPLES (time, ttft, e2e) of one series in a ring; percentiles over the window."""

    def __init__(self) -> None:
        self._at = array("d", [0.0] * SAMPLES)
        self._ttft = array("d", [math.nan] * SAMPLES)
        self._e2e = array("d", [0.0] * SAMPLES)
        self._written = 0
        self._cache: tuple[int, float, float, dict[str, Any]] | None = None  # written, oldest, when, result

    def add(self, at: float, ttft_ms: float | None, e2e_ms: float) -> None:
        slot = self._written % SAMPLES
        self._at[slot] = at
        self._ttft[slot] = math.nan if ttft_ms is None else ttft_ms
        self._e2e[slot] = e2e_ms
        self._written += 1

    def percentiles(self, now: float) -> dict[str, Any]:
        """{"ttft_ms": {p50, p95, p99}, "e2e_ms": {...}} over the window; None where it is empty."""
        horizon = now - LATENCY_WINDOW_S
        cached = self._cache
        if cached is not None and cached[0] == self._written and (cached[1] >= horizon or now < cached[2]):
            return cached[3]
        kept = min(self._written, SAMPLES)
        recent = [i for i in range(kept) if self._at[i] >= horizon]
        ttft = sorted(v for i in recent if not math.isnan(v := self._ttft[i]))
        e2e = sorted(self._e2e[i] for i in recent)
        result = {"ttft_ms": _summary(ttft), "e2e_ms": _summary(e2e)}
        oldest = min((self._at[i] for i in recent), default=math.inf)
        self._cache = (self._written, oldest, now + RECOMPUTE_S, result)
        return result


def _summary(ordered: list[float]) -> dict[str, float | None]:
    if not ordered:
        return {"p50": None, "p95": None, "p99": None}
    return {f"p{q}": round(percentile(ordered, q / 100), 1) for q in (50, 95, 99)}


class PerSecond:
    """Requests and completion tokens per whole second, for the last RING_SECONDS seconds."""

    def __init__(self) -> None:
        self._second = [-1] * RING_SECONDS
        self._requests = [0] * RING_SECONDS
        self._tokens = [0] * RING_SECONDS

    def add(self, second: int, tokens: int) -> None:
        slot = second % RING_SECONDS
        if self._second[slot] != second:
            self._second[slot], self._requests[slot], self._tokens[slot] = second, 0, 0
        self._requests[slot] += 1
        self._tokens[slot] += tokens

    def sums(self, start: int, end: int) -> tuple[int, int]:
        """(requests, tokens) in the seconds [start, end)."""
        requests = tokens = 0
        for second in range(max(start, end - RING_SECONDS + 1), end):
            slot = second % RING_SECONDS
            if self._second[slot] == second:
                requests += self._requests[slot]
                tokens += self._tokens[slot]
        return requests, tokens


class Series:
    """Counters of one tenant, or of one adapter version of a tenant."""

    def __init__(self) -> None:
        self.requests = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.statuses: Counter[int] = Counter()
        self.latency = LatencyWindow()
        self.ttft_histogram = Histogram()
        self.e2e_histogram = Histogram()

    def add(self, record: RequestRecord, now: float) -> None:
        self.requests += 1
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.statuses[record.status] += 1
        if record.admitted:
            self.latency.add(now, record.ttft_ms, record.latency_ms)
            self.e2e_histogram.observe(record.latency_ms / 1000)
            if record.ttft_ms is not None:
                self.ttft_histogram.observe(record.ttft_ms / 1000)

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def counts(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "errors": {str(s): n for s, n in sorted(self.statuses.items()) if s >= 500},
            "client_errors": {
                str(s): n for s, n in sorted(self.statuses.items()) if 400 <= s < 500 and s != RATE_LIMITED
            },
            "rejected": self.statuses[RATE_LIMITED],
        }


class Traffic(Series):
    """A tenant's (or all tenants') counters, with rates, history and its latest requests."""

    def __init__(self, first_second: int) -> None:
        super().__init__()
        self.first_second = first_second
        self.per_second = PerSecond()
        self.recent: deque[RequestRecord] = deque(maxlen=RECENT)

    def add(self, record: RequestRecord, now: float) -> None:
        super().add(record, now)
        self.per_second.add(int(now), record.completion_tokens)
        self.recent.append(record)

    def rates(self, now: float) -> dict[str, float]:
        second, rates = int(now), {}
        for window in RATE_WINDOWS_S:
            requests, tokens = self.per_second.sums(second - window, second)  # whole seconds only
            rates[f"rps_{window}s"] = round(requests / window, 2)
            rates[f"tps_{window}s"] = round(tokens / window, 2)
        return rates

    def history(self, now: float) -> dict[str, Any]:
        """One point per HISTORY_INTERVAL_S, oldest first, since this series was first seen."""
        step = HISTORY_INTERVAL_S
        end = int(now) // step * step  # the last whole interval ends here
        first = max(self.first_second // step * step, end - step * HISTORY_POINTS)
        rps, tps = [], []
        for start in range(first, end, step):
            requests, tokens = self.per_second.sums(start, start + step)
            rps.append(round(requests / step, 2))
            tps.append(round(tokens / step, 2))
        return {"interval_s": float(step), "rps": rps, "tps": tps}


def recent_row(record: RequestRecord) -> dict[str, Any]:
    """A request as `recent` shows it: no key, no prompt, no completion."""
    return {
        "ts": record.ts,
        "model": record.model,
        "adapter_version": record.adapter_version,
        "endpoint": record.endpoint,
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "ttft_ms": record.ttft_ms,
        "latency_ms": record.latency_ms,
        "finish_reason": record.finish_reason,
    }


class TrafficStats:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.total = Traffic(int(clock()))
        self.tenants: dict[str, Traffic] = {}
        self.versions: dict[tuple[str, str], Series] = {}
        """Per (tenant, adapter version); "" is the base model, or a `model` that did not resolve."""
        self.guardrails: Counter[tuple[str, str]] = Counter()
        """Requests a guardrail acted on, per (tenant, guardrail)."""

    def record(self, record: RequestRecord) -> None:
        """The sink: one request's outcome."""
        now = self.clock()
        tenant = self.tenants.get(record.tenant)
        if tenant is None:
            tenant = self.tenants[record.tenant] = Traffic(int(now))
        key = (record.tenant, record.adapter_version)
        version = self.versions.get(key)
        if version is None:
            version = self.versions[key] = Series()
        tenant.add(record, now)
        version.add(record, now)
        self.total.add(record, now)
        for kind in record.guardrails:
            self.guardrails[record.tenant, kind] += 1

    def tenant(self, name: str) -> dict[str, Any]:
        """A tenant's `stats` (docs/admin-api.md) but `queued` and `running`, which admission knows."""
        now = self.clock()
        traffic = self.tenants.get(name)
        if traffic is None:
            traffic = Traffic(int(now))  # no request yet: zeros, no percentiles, no history
        return (
            traffic.counts()
            | traffic.latency.percentiles(now)
            | traffic.rates(now)
            | {"history": traffic.history(now)}
        )

    def version(self, tenant: str, version: str) -> dict[str, Any]:
        """An adapter version's `requests`, `errors` (5xx) and latency percentiles."""
        series = self.versions.get((tenant, version)) or Series()
        return {"requests": series.requests, "errors": series.server_errors} | series.latency.percentiles(
            self.clock()
        )

    def recent(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's latest requests, newest first."""
        traffic = self.tenants.get(tenant)
        return [recent_row(r) for r in reversed(traffic.recent)] if traffic else []

    def totals(self) -> dict[str, Any]:
        rates = self.total.rates(self.clock())
        return {
            "requests": self.total.requests,
            "prompt_tokens": self.total.prompt_tokens,
            "completion_tokens": self.total.completion_tokens,
            "rps_10s": rates["rps_10s"],
            "tps_10s": rates["tps_10s"],
        }

    def series(self) -> Iterator[tuple[str, str, Series]]:
        """(tenant, version, counters) of every version series, for /metrics (copy before yielding
        across an await: the loop goes on counting)."""
        for (tenant, version), series in list(self.versions.items()):
            yield tenant, version, series
