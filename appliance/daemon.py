"""Wiring: the app factory, start-up and shutdown order, and when systemd hears of each step.

Start-up: open the store → listen (healthz answers, readyz says "starting") → start the engine
and watch its health → register the drop folder and warm every tenant's active version → watch
the folder → ready (sd_notify READY=1; systemd.py: more time asked while starting, then watchdog
pings while the engine answers its health probes).

Shutdown, on SIGTERM: refuse new requests (readyz "stopping"), drain those in flight until
`drain_timeout_s`, cut the rest (an error event each), write the usage ledger, then close the
listeners and stop the engine: the slow, killable part comes after the ledger is safe. When the
engine dies or hangs (serving/lifecycle.py, engines/health.py), the same path runs without the
drain and the process exits non-zero, for systemd to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NoReturn

import psutil
from aiohttp import web

from .adapters.drops import AdapterLimits, BaseModelInfo, tenant_folders
from .adapters.peftconfig import import_peft
from .adapters.registry import FolderRegistry, RegistryThread
from .adapters.residency import Plan, ResidencyTracker, lora_budget_bytes, plan
from .adapters.versions import VersionManager
from .adapters.watcher import DropWatcher
from .api.admin import EXPORTER, PLAN, build_admin_app
from .api.batches import add_routes as add_batch_routes
from .api.batches import line_runner
from .api.connections import ConnectionLimits, GuardedAppRunner, fit_to_file_limit
from .api.errors import MAX_BODY_BYTES, openai_errors
from .api.files import add_routes as add_file_routes
from .api.metrics import (
    METRICS_SOURCES,
    MetricsSource,
    batch_metrics,
    build_metrics_app,
    metrics,
    overview_metrics,
    protocol_metrics,
)
from .api.openai import add_routes
from .api.overview import OVERVIEW, Overview
from .api.services import SERVICES, Services
from .batch.files import FOLDER as FILES_FOLDER
from .batch.files import FileStore, all_file_ids
from .batch.runner import BatchRunner
from .config.settings import Settings
from .engines import openmp
from .engines.base import EngineOptions
from .engines.health import EngineHealth
from .engines.select import Selection, select_engine, start_engine
from .errors import ConfigError
from .gguf.export import Exporter
from .ops import filemodes
from .ops.systemd import StartupExtender, Watchdog, sd_notify
from .serving.catalog import Catalog
from .serving.generator import Generator
from .serving.tokenization import TextCodec
from .serving.tools import select as select_tool_format
from .telemetry.device import DeviceSampler
from .telemetry.gpu import gpu_memory
from .telemetry.stats import TrafficStats
from .tenancy import retention
from .tenancy.admission import Admission
from .tenancy.keysync import RevocationSync
from .tenancy.ledger import UsageLedger
from .tenancy.policybook import PolicyBook
from .tenancy.quota import QuotaMeter
from .tenancy.redislimits import RedisLimits, connect
from .tenancy.scheduler import FairScheduler
from .tenancy.store import Store
from .tenancy.writer import StoreWriter

log = logging.getLogger(__name__)
ON_READY: web.AppKey[Callable[[], None]] = web.AppKey("on_ready")
VERSIONS = web.AppKey("versions", VersionManager)
ADAPTERS_DIR = web.AppKey("adapters_dir", Path)
# How long aiohttp waits for a connection's handler when it closes the listeners (twice: before
# and after cancelling it). By then every generation has ended or been cut: only short ones remain.
HANDLER_SHUTDOWN_S = 1.0
# After an engine failure the listeners stay up this long, answering 503 with the reason, so that
# whoever polls /readyz or sends a request sees why rather than only a refused connection.
FAILED_LINGER_S = 2.0
# After an engine failure the daemon exits within this long whatever its cleanup meets (vLLM joins
# its engine core for 5 s, then kills it; a starved machine has taken over 30 s): the usage rows are
# written in the first milliseconds, and systemd restarts a daemon that has exited.
FAILED_EXIT_DEADLINE_S = 15.0
ENGINE_SELECTION = web.AppKey("engine_selection", Selection)
STARTUP = web.AppKey("startup", StartupExtender)
WATCHDOG = web.AppKey("watchdog", Watchdog)
MAX_RUNNING = web.AppKey("max_running", int)


def engine_options(settings: Settings, model_dir: Path) -> EngineOptions:
    return EngineOptions(
        model=str(model_dir),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
        log_level=settings.log_level,
        gguf_model=str(settings.gguf_model or ""),
        cache_dir=str(settings.gguf_cache_dir),
        parallel=settings.llamacpp_parallel,
        threads=settings.llamacpp_threads,
        collect_stats=settings.telemetry,
    )


def plan_residency(settings: Settings, base: BaseModelInfo, model_dir: Path, store: Store) -> Plan:
    """Size the engine's adapter slots so that every tenant's active adapter stays resident."""
    tenants = tenant_folders(settings.adapters_dir)  # one listing: a tenant's folder may be huge
    kept = [r.tenant for r in store.routes() if r.keep_resident]
    memory = gpu_memory()
    gpu_free = None
    if memory is not None:  # vLLM takes its share of the GPU; the weights come out of it first
        weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        # Tensor parallelism shards the weights and every adapter slot alike across the GPUs
        # (alike GPUs): the budget is their sum.
        usable = memory.total * settings.gpu_memory_utilization * settings.tensor_parallel_size
        gpu_free = int(usable) - weights
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    return plan(
        adapters=len(tenants),
        pinned=len(kept),
        base=base,
        max_rank=settings.max_lora_rank,
        dtype_bytes=dtype_bytes,
        lora_budget_bytes=lora_budget_bytes(
            gpu_free_bytes=gpu_free, cpu_budget_bytes=settings.lora_cpu_budget_mib << 20
        ),
        configured_max_loras=settings.max_loras or None,
        configured_max_cpu_loras=settings.max_cpu_loras or None,
    )


def build_app(
    settings: Settings,
    model_dir: Path,
    on_ready: Callable[[], None] | None = None,
    startup: StartupExtender | None = None,
    select: Callable[[str, EngineOptions], Selection] = select_engine,
) -> web.Application:
    """`select` picks the engine: select_engine, always, but for a test double (testing/nullserve.py)."""
    store = Store.connect(settings.database_path)
    filemodes.tighten(settings)  # what an older version left readable by every local user
    # The event loop's connection only reads: every write goes through `writer` or the ledger,
    # each on a thread of its own, so that no lock or slow disk ever holds the loop.
    store.db.execute("PRAGMA query_only = 1")
    writer = StoreWriter(settings.database_path)
    base = BaseModelInfo.from_model_dir(model_dir).named(settings.base_model_name)
    import_peft()
    sizes = plan_residency(settings, base, model_dir, store)
    log.info("residency plan: %s", sizes.reason)
    settings = dataclasses.replace(settings, max_loras=sizes.max_loras, max_cpu_loras=sizes.max_cpu_loras)
    selection = select(settings.engine, engine_options(settings, model_dir))
    log.info("engine: %s", selection.reason)
    limits = AdapterLimits(max_rank=settings.max_lora_rank, support=selection.engine.adapter_support)
    folders = FolderRegistry(
        settings.adapters_dir, base, limits, strict_base_match=settings.strict_base_match
    )
    registry = RegistryThread(settings.database_path, folders)
    versions = VersionManager(
        store, writer, selection.engine, registry, ResidencyTracker(sizes.max_loras, sizes.max_cpu_loras)
    )
    box_id = store.box_id(settings.box_id)
    ledger = UsageLedger(
        settings.database_path, settings.usage_spool_path, commit=settings.usage_commit, box_id=box_id
    )
    ledger.recover()  # what a crash left in the spool, before the quotas are counted from the ledger
    services = Services(
        store=store,
        writer=writer,
        catalog=Catalog(store, versions, settings.base_model_name),
        codec=TextCodec.from_model_dir(model_dir),
        ledger=ledger,
        engine=selection.engine,
        health=EngineHealth(
            selection.engine,
            probe_every_s=settings.engine_probe_interval_s,
            probe_timeout_s=settings.engine_probe_timeout_s,
        ),
        admission=build_admission(settings, store, ledger, box_id),
        engine_name=selection.engine.name,
        engine_reason=selection.reason,
        engine_fallback=selection.fallback,
        box_id=box_id,
    )
    services.tool_format, services.tool_format_reason = select_tool_format(
        settings.tool_parser, services.codec.tokenizer.chat_template
    )
    log.info("tools: %s", services.tool_format_reason)
    services.codec.llg_tokenizer()  # for grammars and logprobs; seconds for a large vocabulary: now
    traffic = TrafficStats()
    if settings.telemetry:
        services.sinks.append(traffic.record)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    overview = Overview(
        services,
        traffic,
        DeviceSampler(),
        model=settings.base_model_name,
        api_url=f"http://{host}:{settings.port}/v1",
    )
    app = web.Application(client_max_size=settings.max_request_bytes, middlewares=[openai_errors])
    app[MAX_BODY_BYTES] = settings.max_request_bytes
    app[SERVICES] = services
    app[OVERVIEW] = overview
    app[VERSIONS] = versions
    app[ADAPTERS_DIR] = settings.adapters_dir
    app[PLAN] = sizes
    app[ENGINE_SELECTION] = selection
    app[MAX_RUNNING] = settings.max_running
    app[EXPORTER] = Exporter(model_dir, settings.exports_path)
    app[ON_READY] = on_ready or (lambda: None)
    app[STARTUP] = startup or StartupExtender(settings.start_timeout_s)  # not started: stop() is a no-op
    app[WATCHDOG] = Watchdog.for_health(services.health.snapshot)
    # The protocol's families first: a router picks by them, so they are read as the scrape comes,
    # not after lorabox's own families have waited for the device reading (up to DeviceSampler.wait_s).
    sources: list[MetricsSource] = [protocol_metrics, overview_metrics, batch_metrics]
    app[METRICS_SOURCES] = sources
    add_routes(app)
    files = FileStore(settings.state_dir / FILES_FOLDER)
    for path in files.sweep(all_file_ids(store)):  # what a crash or a cut upload left
        log.info("removed %s: no stored file names it", path)
    add_file_routes(app, files)
    runner = BatchRunner(
        store,
        writer,
        files,
        line_runner(services),
        ready=lambda: (
            services.generator is not None
            and services.lifecycle.phase == "serving"
            and services.ledger.unavailable is None
        ),
        max_running=lambda: services.admission.scheduler.band_places,
    )
    if settings.metrics_on_api_port:
        app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_watch_loop_lag)
    app.cleanup_ctx.append(_run_engine)
    app.cleanup_ctx.append(lambda _app: services.ledger.run())
    app.cleanup_ctx.append(lambda _app: services.admission.policies.follow(settings.database_path))
    app.cleanup_ctx.append(lambda _app: retention.running(writer, _retention_days(services)))
    if isinstance(shared := services.admission.shared, RedisLimits):
        app.cleanup_ctx.append(lambda _app: shared.running())
        revocations = RevocationSync(connect(settings.limits_backend), store, writer)
        app.cleanup_ctx.append(lambda _app: revocations.running())
    # After the ledger's: at shutdown the runner commits its last results, then books their usage.
    add_batch_routes(app, runner)
    app.on_cleanup.append(lambda _app: registry.close())
    app.on_cleanup.append(lambda _app: writer.close())
    app.on_cleanup.append(lambda _app: _close_store(store))
    app.on_cleanup.append(lambda _app: _close_grammars(services))
    return app


def build_admission(settings: Settings, store: Store, ledger: UsageLedger, box_id: str = "") -> Admission:
    """Policies from the store, quota use seeded from the ledger, the fair queue; and the shared
    counters, when `limits_backend` names a Redis."""

    def warn(tenant: str, detail: str) -> None:
        ledger.event("quota_warning", tenant=tenant, detail=detail)

    def throttle(tenant: str, detail: str) -> None:
        ledger.event("quota_throttled", tenant=tenant, detail=detail)

    def booked_since(since: str) -> dict[str, int]:
        """The database's rows, and those still in the spool (an earlier run's, not replayed yet)."""
        tokens = store.tokens_since(since)
        for tenant, spooled in ledger.spool.tokens_since(since).items():
            tokens[tenant] = tokens.get(tenant, 0) + spooled
        return tokens

    quota = QuotaMeter(on_warning=warn, on_throttle=throttle)
    quota.seed(booked_since, store.last_events("quota_warning"), store.last_events("quota_throttled"))
    shared = None
    if settings.shared_limits:
        fail_open = settings.limits_fail_mode == "open"
        shared = RedisLimits(settings.limits_backend, box_id, quota, fail_open=fail_open)
    return Admission(
        PolicyBook.load(store, settings.tenant_defaults),
        quota,
        # max_running is set once the engine runs (it depends on the engine's batch size).
        FairScheduler(
            settings.max_running or 1,
            settings.max_queued,
            fair=settings.scheduler == "fair",
            max_background=settings.batch_max_running or None,
        ),
        shared=shared,
    )


def _retention_days(services: Services) -> Callable[[str], int | None]:
    # Read on the writer thread: the policies are a dict the event loop replaces whole.
    return lambda tenant: services.admission.policy_for(tenant).retention_days


async def _watch_loop_lag(app: web.Application) -> AsyncIterator[None]:
    async with app[SERVICES].loop_lag.running():
        yield


async def _close_store(store: Store) -> None:
    store.db.close()


async def _close_grammars(services: Services) -> None:
    services.grammars.close()


async def _run_engine(app: web.Application) -> AsyncIterator[None]:
    """Start the engine in the background so that healthz answers while it loads."""
    services, versions = app[SERVICES], app[VERSIONS]
    watcher = DropWatcher(app[ADAPTERS_DIR], versions.sync)

    async def start() -> None:
        began = time.perf_counter()
        sd_notify("STATUS=loading the model")
        selection = await start_engine(app[ENGINE_SELECTION])  # under `auto`, may fall back
        services.engine = versions.engine = services.health.engine = selection.engine
        services.engine_name, services.engine_reason = selection.engine.name, selection.reason
        services.engine_fallback = selection.fallback
        # More than the engine runs at once would wait inside it, first come first served: the
        # fair queue keeps them (the knob may only lower it).
        services.admission.scheduler.max_running = min(
            app[MAX_RUNNING] or selection.engine.max_batch, selection.engine.max_batch
        )
        services.health.start(services.lifecycle.fail)
        # What start-up made (torch, vLLM, the tokenizer: 600,000 objects) lives as long as the
        # process: out of the collector's sight, or each full collection holds every thread, the
        # event loop included, for half a second, and allocation-heavy work (a drop of 10,000
        # folders) brings those on. vLLM's engine core does the same in its process.
        gc.freeze()
        await versions.sync_all()
        await watcher.start()
        max_len = getattr(services.engine, "max_model_len", None) or 4096
        services.generator = Generator(services.engine, services.codec, max_len)
        log.info("ready in %.1f s (%s)", time.perf_counter() - began, services.engine_reason)
        app[STARTUP].stop()
        sd_notify("READY=1\nSTATUS=serving")
        app[WATCHDOG].start()  # systemd arms its watchdog at READY=1
        app[ON_READY]()

    task = asyncio.create_task(start())
    task.add_done_callback(_exit_if_failed)
    yield
    task.cancel()
    await app[WATCHDOG].stop()
    await services.health.stop()
    await watcher.stop()
    services.generator = None
    await services.engine.shutdown()


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.error("engine failed to start: %s", task.exception(), exc_info=task.exception())
    # A daemon without an engine is useless: exit non-zero so systemd restarts or reports it.
    os._exit(3)


async def _serve(settings: Settings, app: web.Application, listener: socket.socket) -> str | None:
    """Serve until SIGTERM/SIGINT or an engine failure; returns the failure, if that was it."""
    services = app[SERVICES]
    lifecycle = services.lifecycle
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lifecycle.stop)

    # handler_cancellation: a client that disconnects cancels its request (and so the generation).
    limits = ConnectionLimits(
        header_timeout_s=settings.request_header_timeout_s,
        body_timeout_s=settings.request_body_timeout_s,
        max_connections=fit_to_file_limit(settings.max_connections),
    )
    api = GuardedAppRunner(
        app,
        limits,
        services.connections,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=HANDLER_SHUTDOWN_S,
    )
    admin = web.AppRunner(
        build_admin_app(services, app[PLAN], app[EXPORTER], app[OVERVIEW]),
        access_log=None,
        shutdown_timeout=HANDLER_SHUTDOWN_S,
    )
    # The metrics listener first: an address it cannot have stops the start before anything runs.
    metrics_site = await _listen_for_metrics(settings, app)
    await api.setup()
    await admin.setup()
    socket_path = settings.admin_socket_path
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    await web.UnixSite(admin, str(socket_path)).start()
    os.chmod(socket_path, 0o660)
    await web.SockSite(api, listener).start()
    log.info("listening on http://%s:%d (admin API on %s)", settings.host, settings.port, socket_path)
    try:
        await lifecycle.stopped()
    finally:
        await app[WATCHDOG].stop()  # systemd disarms it when the service stops, or restarts it
        await services.health.stop()  # stopping, the engine's end is expected
        if lifecycle.failure:
            log.error("the engine failed (%s): ending every request and exiting", lifecycle.failure)
            exit_anyway_after(FAILED_EXIT_DEADLINE_S)
            sd_notify(f"STATUS=engine failed: {lifecycle.failure}")
        else:
            log.info("shutting down: draining requests for up to %g s", settings.drain_timeout_s)
            # Only ever extends TimeoutStopSec, for a drain configured longer than the unit allows.
            sd_notify(f"STOPPING=1\nEXTEND_TIMEOUT_USEC={int(settings.stop_timeout_s * 1e6)}")
        await lifecycle.wind_down(settings.drain_timeout_s)
        await services.ledger.flush()  # before anything slow that a SIGKILL could cut short
        await services.ledger.sync()
        if lifecycle.failure:
            await asyncio.sleep(FAILED_LINGER_S)
        await admin.cleanup()
        if metrics_site is not None:
            await metrics_site.cleanup()
        await api.cleanup()
        socket_path.unlink(missing_ok=True)
        log.info("stopped")
    return lifecycle.failure


async def _listen_for_metrics(settings: Settings, app: web.Application) -> web.AppRunner | None:
    """`GET /metrics` on `metrics_listen`, a listener of its own (its metrics name every tenant)."""
    address = settings.metrics_address
    if address is None:
        return None
    runner = web.AppRunner(
        build_metrics_app(app[OVERVIEW], app[METRICS_SOURCES]),
        access_log=None,
        shutdown_timeout=HANDLER_SHUTDOWN_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, *address).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"metrics_listen: cannot listen on {settings.metrics_listen}: {exc.strerror}"
        ) from exc
    log.info("metrics on http://%s/metrics", settings.metrics_listen)
    return runner


def exit_anyway_after(seconds: float) -> None:
    """Exit with status 1 in `seconds` if the process has not exited by then (a daemon thread)."""

    def exit_now() -> None:
        log.error("not stopped %g s after the engine failed: exiting now", seconds)
        end_children()
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()


def end_children() -> None:
    """SIGKILL what this process started and still runs: after an engine failure, an engine core
    and its workers that the engine's own shutdown did not end in time. Outside systemd (which
    ends the whole control group) nothing else would, and each holds gigabytes and CPU. Python's
    resource tracker is left to end itself: it cleans up after its parent once that is gone."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                child.kill()


SWITCH_INTERVAL_S = 0.001
"""How long a thread holding the GIL keeps it while another asks (Python's default: 5 ms). The
event loop shares the GIL with the daemon's other threads (watchdog's, the executors', vLLM's
output handler): each time the loop comes back from a socket or epoll it asks again, and with
several threads busy it could wait a switch interval each time. Measured (2 cores, llama.cpp
demo box, /healthz every 20 ms from another process while 10,000 empty version folders were made
and removed in a tenant's adapters folder, 3 drops each): slowest /healthz 85-322 ms at 5 ms,
39-44 ms at 1 ms. Throughput side by side (4 streamed clients, 4 rounds of 15 s): llama.cpp the
same (5 ms against 1 ms: 0.92-1.06x), vLLM 0.85-0.94x (1 ms faster). vLLM's processes keep
Python's default where vLLM spawns them (on CPU it always does: its CPU platform sets
VLLM_WORKER_MULTIPROC_METHOD=spawn); where it forks them (its default elsewhere) they inherit
this process's interval (not measured on a GPU)."""


def serve(
    settings: Settings,
    model_dir: Path,
    listener: socket.socket,
    on_ready: Callable[[], None] | None = None,
    startup: StartupExtender | None = None,
    select: Callable[[str, EngineOptions], Selection] = select_engine,
) -> NoReturn:
    """Serve until stopped; exits the process: 0 after SIGTERM/SIGINT, 1 after an engine failure.

    `listener` is the API's socket, bound before anything slow (api/bind.py); `startup`, already
    running, asks systemd for time until the engine is ready."""
    os.umask(filemodes.UMASK)  # what the daemon creates is the service's and its group's only
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    openmp.passive()  # before build_app loads torch, and with it OpenMP (engines/openmp.py)
    failure = asyncio.run(
        _serve(settings, build_app(settings, model_dir, on_ready, startup, select), listener)
    )
    if failure is not None:
        print(
            f"lorabox: the engine failed ({failure}); exiting for systemd to restart lorabox", file=sys.stderr
        )
    # Everything is written and closed by now (usage ledger, store, sockets, engine). The
    # interpreter's own teardown would spend seconds more collecting torch's and vLLM's modules
    # (4-11 s measured here, in Py_FinalizeEx), time a restart or systemd's stop timeout should
    # not spend.
    if failure is not None:
        end_children()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failure else 0)
