"""`GET /metrics`: Prometheus text format, on a listener of its own (`metrics_listen`).

The metrics name every tenant, its traffic and its adapter versions, so they are not on the API
port that tenants reach (there `/metrics` is 404 unless `metrics_on_api_port` is set). No key is
needed, as for any Prometheus target: keep the listener on loopback or a management network.

The text is the concatenation of the app's `METRICS_SOURCES`, each an async function that
returns whole metric families in the text format: the model server protocol's families under
vLLM's names first (telemetry/protocol.py), which routers such as the inference gateway's endpoint
picker scrape, so they are read as the scrape comes; then lorabox's own telemetry
(telemetry/metrics.py), which may wait for a fresh device reading, and the batch families. Each
copies what it needs on the event loop and writes its text on a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..batch import overview as batch_overview
from ..telemetry import protocol
from ..telemetry.metrics import MetricsSnapshot, render
from .overview import OVERVIEW, Overview

# The classic text format, which every Prometheus reads (render writes nothing newer).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricsSource = Callable[[Overview], Awaitable[bytes]]
METRICS_SOURCES: web.AppKey[list[MetricsSource]] = web.AppKey("metrics_sources")


async def overview_metrics(overview: Overview) -> bytes:
    """lorabox's own families: traffic per tenant and version, the box, the engine, the device."""
    status = await overview.status()
    loads = [
        (name, load.running, load.queued, load.background_running, load.background_queued)
        for name, load in overview.loads().items()
    ]
    snapshot = MetricsSnapshot.take(overview.traffic, status, loads, overview.services.admission.throttled)
    return await asyncio.to_thread(render, snapshot)


async def protocol_metrics(overview: Overview) -> bytes:
    """The model server protocol's families: queue, running, KV cache, adapters in use."""
    services = overview.services
    admission = services.admission
    stats = overview.engine_stats()
    running, waiting = admission.adapters_in_use()
    snapshot = protocol.ProtocolSnapshot(
        model_name=overview.model,
        waiting=admission.queued + (stats.waiting_requests if stats else 0),
        running=stats.running_requests if stats else 0,
        kv_cache_usage=stats.kv_cache_usage if stats else None,
        max_lora=(stats.gpu_slots or services.engine.max_batch) if stats else None,
        running_adapters=running,
        waiting_adapters=waiting,
        kv_cache_blocks=stats.kv_cache_blocks if stats else None,
    )
    return await asyncio.to_thread(protocol.render, snapshot)


async def batch_metrics(overview: Overview) -> bytes:
    """The background band and the batch jobs not yet ended."""
    services = overview.services
    view = batch_overview.batches(services.store, services.admission.scheduler)
    return await asyncio.to_thread(batch_overview.render, view)


async def metrics(request: web.Request) -> web.Response:
    overview = request.app[OVERVIEW]
    parts = [await source(overview) for source in request.app[METRICS_SOURCES]]
    return web.Response(body=b"".join(parts), headers={"Content-Type": CONTENT_TYPE})


def build_metrics_app(overview: Overview, sources: list[MetricsSource]) -> web.Application:
    """The metrics listener's app: `/metrics` and nothing else."""
    app = web.Application()
    app[OVERVIEW] = overview
    app[METRICS_SOURCES] = sources
    app.router.add_get("/metrics", metrics)
    return app
