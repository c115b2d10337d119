"""Wiring: the app factory, start-up and shutdown order, sd_notify.

Start-up: open the store → register the drop folder → listen (healthz answers, readyz says
"starting") → start the engine → warm-load every tenant's active adapter → ready (sd_notify
READY=1). Shutdown: stop listening, drain, stop the engine, flush usage, close the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from .api.errors import MAX_BODY_BYTES, openai_errors
from .api.openai import SERVICES, Services, add_routes
from .config import Settings
from .drops import AdapterLimits, BaseModelInfo, register_all
from .engines.base import AdapterRef, Engine, EngineOptions
from .engines.select import create_engine
from .errors import AdapterError
from .serving import Catalog, Generator
from .store import Store
from .tokenization import TextCodec
from .usage import UsageLedger

log = logging.getLogger(__name__)
ENGINE = web.AppKey("engine", Engine)
ON_READY = web.AppKey("on_ready", Callable[[], None])


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


def engine_options(settings: Settings, model_dir: Path) -> EngineOptions:
    return EngineOptions(
        model=str(model_dir),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        log_level=settings.log_level,
    )


async def warm_adapters(engine: Engine, store: Store) -> None:
    """Load every tenant's active version so that no first request pays the load."""
    tenants = sorted({a.tenant for a in store.adapters() if a.state == "ready"})
    for tenant in tenants:
        active = store.active_adapter(tenant)
        if active is None:
            continue
        try:
            await engine.load_adapter(AdapterRef(active.engine_name, active.path))
        except AdapterError as exc:
            log.error("%s", exc)
            store.record_event("adapter_load_failed", tenant=tenant, version=active.version, detail=str(exc))


def build_app(
    settings: Settings, model_dir: Path, on_ready: Callable[[], None] | None = None
) -> web.Application:
    store = Store.connect(settings.database_path)
    base = BaseModelInfo.from_model_dir(model_dir)
    seen = register_all(store, settings.adapters_dir, base, AdapterLimits(max_rank=settings.max_lora_rank))
    log.info("registered %d adapter version(s) from %s", len(seen), settings.adapters_dir)
    engine, reason = create_engine(settings.engine, engine_options(settings, model_dir))
    log.info("engine: %s", reason)
    services = Services(
        store=store,
        catalog=Catalog(store, settings.base_model_name),
        codec=TextCodec.from_model_dir(model_dir),
        ledger=UsageLedger(store),
        engine_name=engine.name,
    )
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[openai_errors])
    app[MAX_BODY_BYTES] = settings.max_request_bytes
    app[SERVICES] = services
    app[ENGINE] = engine
    app[ON_READY] = on_ready or (lambda: None)
    add_routes(app)
    app.cleanup_ctx.append(_run_engine)
    app.cleanup_ctx.append(lambda _app: services.ledger.run())
    app.on_cleanup.append(lambda _app: _close_store(store))
    return app


async def _close_store(store: Store) -> None:
    store.db.close()


async def _run_engine(app: web.Application) -> AsyncIterator[None]:
    """Start the engine in the background so that healthz answers while it loads."""
    services, engine = app[SERVICES], app[ENGINE]

    async def start() -> None:
        began = time.perf_counter()
        await engine.start()
        await warm_adapters(engine, services.store)
        max_len = getattr(engine, "max_model_len", None) or 4096
        services.generator = Generator(engine, services.codec, max_len)
        log.info("ready in %.1f s (engine %s)", time.perf_counter() - began, engine.name)
        sd_notify("READY=1\nSTATUS=serving")
        app[ON_READY]()

    task = asyncio.create_task(start())
    task.add_done_callback(_exit_if_failed)
    yield
    sd_notify("STOPPING=1")
    task.cancel()
    services.generator = None
    await engine.shutdown()


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.error("engine failed to start: %s", task.exception(), exc_info=task.exception())
    # A daemon without an engine is useless: exit non-zero so systemd restarts or reports it.
    os._exit(3)


def serve(settings: Settings, model_dir: Path, on_ready: Callable[[], None] | None = None) -> None:
    app = build_app(settings, model_dir, on_ready)
    log.info("listening on http://%s:%d", settings.host, settings.port)
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,  # a client that disconnects cancels its request
        print=None,
        access_log=None,
        shutdown_timeout=30,
    )
