"""What the admin API, `/metrics` and `lorabox status` read: the box's status and one row per
tenant, in the shapes of docs/admin-api.md.

Built on the event loop from in-memory state and small SQLite reads; the only slow source, the
GPUs and the host, is read on a thread of its own (telemetry/device.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..adapters.residency import Residency
from ..batch import overview as batch_overview
from ..engines.base import EngineStats
from ..telemetry.device import DeviceReading, DeviceSampler
from ..telemetry.stats import TrafficStats
from ..tenancy.store import AdapterVersion, Route, Tenant

if TYPE_CHECKING:  # the API module imports this one (for /metrics)
    from .services import Services


@dataclass(frozen=True)
class TenantLoad:
    """What admission knows of one tenant now."""

    running: int
    queued: int
    policy: dict[str, Any] | None
    """The effective policy (the tenant's own, else the configured defaults)."""
    quota: dict[str, Any] | None
    """Tokens used in the current period, the limit and the share used."""
    background_running: int = 0
    """Batch lines and flex requests, which run in the scheduler's background band."""
    background_queued: int = 0


def admission_load(admission: Any, tenant: str) -> TenantLoad:
    """The QoS admission object's view of one tenant: the one place that knows its API."""
    return TenantLoad(**admission.tenant_load(tenant))


def tenant_load(services: Services, tenant: str, running: Mapping[str, int]) -> TenantLoad:
    """Queue, running requests, policy and quota of one tenant.

    QoS admission (`services.admission`) knows all four. Without it, `running` is what the
    adapter versions' leases count (requests on the tenant's adapter; base-model requests hold
    none), nothing queues in lorabox, and policy and quota are unknown (null)."""
    admission = getattr(services, "admission", None)
    if admission is not None:
        return admission_load(admission, tenant)
    return TenantLoad(running=running.get(tenant, 0), queued=0, policy=None, quota=None)


def engine_payload(stats: EngineStats) -> dict[str, Any]:
    return {
        "running": stats.running_requests,
        "waiting": stats.waiting_requests,
        "kv_cache_usage": None if stats.kv_cache_usage is None else round(stats.kv_cache_usage, 4),
        "gpu_slots": stats.gpu_slots,
        "pinned": stats.pinned,
        "device": stats.device,
        "loaded_adapters": stats.loaded_adapters,
        "memory": dataclasses.asdict(stats.memory),
        "extra": stats.extra,
    }


def device_payload(reading: DeviceReading, engine: EngineStats | None) -> dict[str, Any]:
    """GPUs (or "cpu": CPU only), the VRAM split as the engine reports it, and the host."""
    on_gpu = engine is not None and engine.device not in ("cpu", "unknown")
    kind = "gpu" if reading.gpus or on_gpu else "cpu"
    split = None
    if on_gpu and engine is not None:
        memory = engine.memory
        known = (memory.weights, memory.kv_cache, memory.adapter_slots)
        used = reading.gpus[0].memory_used if reading.gpus else None
        if any(v is not None for v in known):
            # Whatever the engine does not account for (CUDA context, activations, other
            # processes) is "other", so the parts add up to what GPU 0 reports as used.
            other = max(used - sum(v or 0 for v in known), 0) if used is not None else None
            split = {
                "base_weights": memory.weights,
                "kv_cache": memory.kv_cache,
                "adapter_slots": memory.adapter_slots,
                "other": other,
            }
    return {
        "kind": kind,
        "gpus": [dataclasses.asdict(gpu) for gpu in reading.gpus],
        "vram_split": split,
        "host": dataclasses.asdict(reading.host),
    }


class Overview:
    def __init__(
        self, services: Services, traffic: TrafficStats, device: DeviceSampler, *, model: str, api_url: str
    ) -> None:
        self.services, self.traffic, self.device = services, traffic, device
        self.model, self.api_url = model, api_url

    # -- the box ------------------------------------------------------------------------------

    def state(self) -> tuple[str, str | None]:
        """(starting | ready | refusing | draining | failed, why not ready)."""
        services = self.services
        failure = services.lifecycle.failure or services.engine.failure()
        if failure is not None:
            return "failed", failure
        if services.lifecycle.phase == "stopping":
            return "draining", "lorabox is shutting down"
        if services.generator is None:
            return "starting", "the model is still loading"
        if services.ledger.unavailable is not None:
            return "refusing", f"usage ledger unavailable: {services.ledger.unavailable}"
        if (limits := services.admission.limits_problem()) is not None:
            return ("refusing" if limits[1] else "ready"), limits[0]
        return "ready", None

    def engine_stats(self) -> EngineStats | None:
        return self.services.engine.stats() if self.services.generator is not None else None

    def residency(self) -> dict[str, tuple[Residency, AdapterVersion]]:
        """Every ready adapter version by engine name: where it lives, and its registry entry."""
        by_name = {a.engine_name: a for a in self.services.store.adapters() if a.state == "ready"}
        report = self.services.catalog.versions.residency.report(sorted(by_name))
        return {r.name: (r, by_name[r.name]) for r in report}

    async def status(self) -> dict[str, Any]:
        services = self.services
        state, reason = self.state()
        engine = self.engine_stats()
        reading = await self.device.read()
        tiers = [r.tier for r, _ in self.residency().values()]
        loads = self.loads().values()
        return {
            "state": state,
            "ready": state == "ready",
            "reason": reason,
            "engine": services.engine_name,
            "engine_reason": services.engine_reason,
            "engine_fallback": services.engine_fallback or None,
            "model": self.model,
            "api_url": self.api_url,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - services.started_at, 1),
            "engine_stats": engine_payload(engine) if engine else None,
            "adapters": {tier: tiers.count(tier) for tier in ("gpu", "cpu", "disk")},
            "device": device_payload(reading, engine),
            "totals": self.traffic.totals()
            | {"running": sum(load.running for load in loads), "queued": sum(load.queued for load in loads)},
            "loop_lag": dataclasses.asdict(services.loop_lag.snapshot()),
            "phase": services.lifecycle.phase,
            "engine_health": dataclasses.asdict(services.health.snapshot()),
            "connections": dataclasses.asdict(services.connections),
            "ledger": dataclasses.asdict(services.ledger.health()),
            "limits": services.admission.limits_state() | {"box_id": services.box_id},
            "batches": batch_overview.batches(services.store, services.admission.scheduler),
        }

    # -- tenants ------------------------------------------------------------------------------

    def loads(self) -> dict[str, TenantLoad]:
        """Every tenant's running and queued requests, policy and quota."""
        services = self.services
        running = services.catalog.versions.running_by_tenant()
        return {t.name: tenant_load(services, t.name, running) for t in services.store.list_tenants()}

    def _row(
        self,
        tenant: Tenant,
        route: Route,
        residency: dict[str, tuple[Residency, AdapterVersion]],
        load: TenantLoad,
    ) -> dict[str, Any]:
        versions = self.services.catalog.versions
        active, canary = versions.active(tenant.name), versions.canary(tenant.name)
        placed = residency.get(active.engine_name) if active else None
        return {
            "name": tenant.name,
            "allow_base_model": tenant.allow_base_model,
            "disabled": tenant.disabled,
            "created_at": tenant.created_at,
            "active_version": active.version if active else route.active_version,
            "pinned_version": route.pinned_version,
            "canary": {"version": canary[0], "percent": canary[1]} if canary else None,
            "keep_resident": route.keep_resident,
            "tier": placed[0].tier if placed else None,
            "policy": load.policy,
            "quota": load.quota,
            "stats": self.traffic.tenant(tenant.name)
            | {
                "queued": load.queued,
                "running": load.running,
                "background_queued": load.background_queued,
                "background_running": load.background_running,
            },
        }

    def tenants(self) -> list[dict[str, Any]]:
        services = self.services
        residency, running = self.residency(), services.catalog.versions.running_by_tenant()
        routes = {r.tenant: r for r in services.store.routes()}
        return [
            self._row(
                t, routes.get(t.name) or Route(t.name), residency, tenant_load(services, t.name, running)
            )
            for t in services.store.list_tenants()
        ]

    def tenant(self, name: str) -> dict[str, Any] | None:
        """One tenant's row with its versions, keys and latest requests; None if there is none."""
        services = self.services
        tenant = services.store.get_tenant(name)
        if tenant is None:
            return None
        residency = self.residency()
        load = tenant_load(services, name, services.catalog.versions.running_by_tenant())
        row = self._row(tenant, services.store.route(name), residency, load)
        placed = {adapter.version: where for where, adapter in residency.values() if adapter.tenant == name}
        versions = []
        for adapter in adapter_rows(services, name):
            where = placed.get(adapter["version"])
            versions.append(
                adapter
                | {"tier": where.tier if where else None, "pinned": bool(where and where.pinned)}
                | self.traffic.version(name, adapter["version"])
            )
        keys = [
            {"key_id": k["key_id"], "created_at": k["created_at"], "revoked_at": k["revoked_at"]}
            for k in services.store.list_keys(name)
        ]
        return row | {"versions": versions, "keys": keys, "recent": self.traffic.recent(name)}


def adapter_rows(services: Services, tenant: str | None = None) -> list[dict[str, Any]]:
    """Registered adapter versions with their state, and whether and how they serve."""
    versions = services.catalog.versions
    loaded = versions.loaded_names()
    rows = []
    for adapter in services.store.adapters(tenant):
        active = versions.active(adapter.tenant)
        canary = versions.canary(adapter.tenant)
        rows.append(
            {
                "tenant": adapter.tenant,
                "version": adapter.version,
                "state": adapter.state,
                "reason": adapter.reason,
                "base_model": adapter.base_model,
                "note": adapter.note,
                "rank": adapter.rank,
                "target_modules": list(adapter.target_modules),
                "size_bytes": adapter.size_bytes,
                "sha256": adapter.sha256,
                "active": active is not None and active.engine_name == adapter.engine_name,
                "canary_percent": canary[1] if canary and canary[0] == adapter.version else 0,
                "loaded": adapter.engine_name in loaded,
                "requests": versions.requests_per_version[(adapter.tenant, adapter.version)],
            }
        )
    return rows


OVERVIEW = web.AppKey("overview", Overview)
