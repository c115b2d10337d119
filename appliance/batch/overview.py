"""What the admin API, `/metrics`, `lorabox status` and the TUI show of batch work: the background
band (its places, what it runs and what waits, its share of what runs) and the batch jobs not yet
ended, with their progress as committed (batch/runner.py commits results in groups)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..tenancy.scheduler import FairScheduler
from ..tenancy.store import Store
from . import jobs

SHOWN_JOBS = 20
"""Jobs listed at most, oldest first (the ones running now): the rest are counted."""


def band(scheduler: FairScheduler) -> dict[str, Any]:
    running, interactive = scheduler.background_running, scheduler.running
    return {
        "places": scheduler.band_places,
        "running": running,
        "queued": scheduler.background_queued,
        "interactive_running": interactive,
        "share": round(running / (running + interactive), 3) if running + interactive else 0.0,
    }


def job(batch: jobs.Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "tenant": batch.tenant,
        "status": batch.status,
        "total": batch.total,
        "completed": batch.completed,
        "failed": batch.failed,
        "created_at": batch.created_at,
        "expires_at": batch.expires_at,
    }


def batches(store: Store, scheduler: FairScheduler) -> dict[str, Any]:
    active = jobs.active_batches(store)
    return {"band": band(scheduler), "active": len(active), "jobs": [job(b) for b in active[:SHOWN_JOBS]]}


class _Collector(Collector):
    def __init__(self, view: dict[str, Any]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        now = self.view["band"]
        for name, key, text in (
            ("places", "places", "Places the background band (batch lines, flex requests) may hold."),
            ("running", "running", "Background requests (batch lines, flex requests) running now."),
            ("queued", "queued", "Background requests waiting for a place."),
        ):
            yield GaugeMetricFamily(f"lorabox_batch_band_{name}", text, value=now[key])
        yield GaugeMetricFamily(
            "lorabox_batches_active", "Batch jobs not yet ended.", value=self.view["active"]
        )
        remaining = GaugeMetricFamily(
            "lorabox_batch_lines_remaining",
            f"Lines without a result of the {SHOWN_JOBS} oldest active batch jobs, per tenant.",
            labels=["tenant"],
        )
        left: dict[str, int] = {}
        for entry in self.view["jobs"]:
            left[entry["tenant"]] = (
                left.get(entry["tenant"], 0) + entry["total"] - entry["completed"] - entry["failed"]
            )
        for tenant, count in sorted(left.items()):
            remaining.add_metric([tenant], count)
        yield remaining


def render(view: dict[str, Any]) -> bytes:
    """The batch families in Prometheus' text format, from a registry of their own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(view))
    return generate_latest(registry)
