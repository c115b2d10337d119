"""`GET /metrics` on the API port: Prometheus text format (telemetry/metrics.py).

No key is needed, as for any Prometheus target: keep the API port on loopback or behind a proxy
that does not pass /metrics to the internet (it names tenants). The counters are copied on the
event loop; the text is written on a thread.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..telemetry.metrics import MetricsSnapshot, render
from .overview import OVERVIEW

# The classic text format, which every Prometheus reads (render writes nothing newer).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def metrics(request: web.Request) -> web.Response:
    overview = request.app[OVERVIEW]
    status = await overview.status()
    loads = [(name, load.running, load.queued) for name, load in overview.loads().items()]
    snapshot = MetricsSnapshot.take(overview.traffic, status, loads)
    body = await asyncio.to_thread(render, snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
