"""The admin API: JSON over a Unix socket (mode 0660, the service's group). CLI and TUI use it.

It never listens on TCP: whoever can open the socket is an operator of this box. Its writes go
through the store's writer thread (tenancy/writer.py), never on the event loop; a database that
does not take one (locked by another program, full) is a 503 saying so, with Retry-After when it
is only busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from ..adapters.residency import Plan
from ..adapters.versions import VersionManager
from ..errors import AdapterError, ConversionError, PolicyError, StoreError, StoreUnavailable
from ..gguf import EXPORT_QUANTS
from ..gguf.export import Exporter, ExportRefused, check_export_name, tenant_adapter
from ..names import is_tenant_name, natural_key
from ..telemetry.gpu import gpu_memory
from ..tenancy.audit import Change, user_name
from ..tenancy.scheduler import TenantLoad
from ..tenancy.store import Route, Store
from .adminclient import SUDO_HEADER
from .adminstream import FEED, EventFeed, stream
from .body import read_json
from .errors import MAX_BODY_BYTES, APIError, Handler, bad_request, openai_errors
from .overview import OVERVIEW, Overview, adapter_rows
from .services import SERVICES, Services

PLAN = web.AppKey("plan", Plan)
EXPORTER = web.AppKey("exporter", Exporter)
EXPORT_LOCK = web.AppKey("export_lock", asyncio.Lock)


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


# A user name as useradd allows it (what SUDO_USER can hold); anything else is not believed.
_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")


def peer_user(request: web.Request) -> str:
    """The Unix user on the other end of the admin socket (SO_PEERCRED): the audit log's actor.

    Root's client may say who ran it with sudo (SUDO_HEADER), as the CLI writing the database
    itself records it (tenancy/audit.local_user): only root's word is taken, since root may write
    the database as anyone anyway."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None:
        return "unknown"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "unknown"
    _pid, uid, _gid = struct.unpack("3i", creds)
    name = user_name(uid)
    sudo = request.headers.get(SUDO_HEADER, "")
    return f"{name} (sudo by {sudo})" if uid == 0 and _USER_NAME.fullmatch(sudo) else name


def tenant_of(request: web.Request) -> str:
    """The `{tenant}` of the URL; 400 unless it is a tenant name (nothing else reaches the store)."""
    name = request.match_info["tenant"]
    if not is_tenant_name(name):
        raise bad_request(f"not a tenant name: {name[:80]!r}", "tenant", "invalid_tenant")
    return name


@web.middleware
async def store_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A write the database did not take: 503, saying why; Retry-After when it is only busy."""
    try:
        return await handler(request)
    except StoreUnavailable as exc:
        code = "database_busy" if exc.busy else "database_unavailable"
        raise APIError(503, str(exc), code=code, headers={"Retry-After": "1"} if exc.busy else {}) from exc


def _route_state(route: Route, versions: VersionManager) -> dict[str, Any]:
    active = versions.active(route.tenant)
    canary = versions.canary(route.tenant)
    return {
        "active": active.version if active else None,
        "pinned": route.pinned_version,
        "canary": f"{canary[0]} {canary[1]}%" if canary else None,
        "keep_resident": route.keep_resident,
    }


async def _audit_route(
    services: Services, request: web.Request, action: str, tenant: str, before: dict[str, Any]
) -> None:
    """Record an adapter action with the route as it was and as it is now."""
    after = _route_state(services.store.route(tenant), services.catalog.versions)
    await services.writer.call(Store.audit, peer_user(request), action, tenant, Change.of(before, after))


@contextmanager
def _conflict(param: str) -> Iterator[None]:
    """An operator action the current state does not allow is a 409 naming the parameter."""
    try:
        yield
    except StoreError as exc:
        raise APIError(409, str(exc), param=param) from exc


async def status(request: web.Request) -> web.Response:
    return web.json_response(await request.app[OVERVIEW].status())


async def adapters(request: web.Request) -> web.Response:
    return web.json_response({"adapters": adapter_rows(_services(request))})


async def tenants(request: web.Request) -> web.Response:
    return web.json_response({"tenants": request.app[OVERVIEW].tenants()})


async def tenant(request: web.Request) -> web.Response:
    name = request.match_info["tenant"]
    detail = request.app[OVERVIEW].tenant(name)
    if detail is None:
        raise APIError(404, f"no tenant named {name!r}", param="tenant", code="tenant_not_found")
    return web.json_response(detail)


async def events(request: web.Request) -> web.Response:
    try:
        limit = min(int(request.query.get("limit", "100")), 10_000)
    except ValueError as exc:
        raise bad_request("limit must be an integer", "limit") from exc
    return web.json_response({"events": _services(request).store.events(limit)})


async def usage(request: web.Request) -> web.Response:
    return web.json_response({"usage": _services(request).store.usage_summary(request.query.get("tenant"))})


async def activate(request: web.Request) -> web.Response:
    """Pin a version (rollback), or `{"version": null}` to follow the newest again."""
    services = _services(request)
    body = await read_json(request)
    version = body.get("version") if isinstance(body, dict) else None
    if version is not None and not isinstance(version, str):
        raise bad_request("version must be a string or null", "version")
    tenant = tenant_of(request)
    versions = services.catalog.versions
    before = _route_state(services.store.route(tenant), versions)
    with _conflict("version"):
        active = await versions.activate(tenant, version)
    if version is None:
        action = "unpin"
    else:
        older = before["active"] is not None and natural_key(version) < natural_key(before["active"])
        action = "rollback" if older else "activate"
    await _audit_route(services, request, action, tenant, before)
    return web.json_response(
        {"tenant": tenant, "active": active.version if active else None, "pinned": version}
    )


async def canary(request: web.Request) -> web.Response:
    services = _services(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("body must be an object with version and percent")
    version, percent = body.get("version"), body.get("percent", 0)
    if version is not None and not isinstance(version, str):
        raise bad_request("version must be a string or null", "version")
    if isinstance(percent, bool) or not isinstance(percent, int):
        raise bad_request("percent must be an integer", "percent")
    tenant = tenant_of(request)
    before = _route_state(services.store.route(tenant), services.catalog.versions)
    with _conflict("version"):
        await services.catalog.versions.set_canary(tenant, version, percent)
    await _audit_route(services, request, "canary", tenant, before)
    current = services.catalog.versions.canary(tenant)
    return web.json_response(
        {"tenant": tenant, "canary": {"version": current[0], "percent": current[1]} if current else None}
    )


async def resident(request: web.Request) -> web.Response:
    """Keep a tenant's active adapter in a GPU slot (`{"keep": true}`), or release it."""
    services = _services(request)
    body = await read_json(request)
    keep = body.get("keep") if isinstance(body, dict) else None
    if not isinstance(keep, bool):
        raise bad_request("keep must be true or false", "keep")
    tenant = tenant_of(request)
    before = _route_state(services.store.route(tenant), services.catalog.versions)
    with _conflict("tenant"):
        pinned = await services.catalog.versions.keep_resident(tenant, keep)
    await _audit_route(services, request, "residency_pin" if keep else "residency_unpin", tenant, before)
    return web.json_response({"tenant": tenant, "keep_resident": keep, "pinned_version": pinned})


async def accept(request: web.Request) -> web.Response:
    """Serve a version trained on another base, which strict_base_match holds (`{"version": ...}`)."""
    services = _services(request)
    body = await read_json(request)
    version = body.get("version") if isinstance(body, dict) else None
    if not isinstance(version, str):
        raise bad_request("version must be a string", "version")
    tenant = tenant_of(request)
    adapter = services.store.get_adapter(tenant, version)
    if adapter is None:
        raise APIError(
            404, f"{tenant}@{version} is not registered", param="version", code="adapter_not_found"
        )
    if not adapter.note:
        raise APIError(
            409, f"{tenant}@{version} names the served base model: nothing to accept", param="version"
        )
    await services.writer.call(Store.accept_base, adapter, actor=peer_user(request))
    await services.catalog.versions.sync(tenant)
    after = services.store.get_adapter(tenant, version)
    return web.json_response({"tenant": tenant, "version": version, "state": after.state if after else None})


async def sync(request: web.Request) -> web.Response:
    """Rescan one tenant's folder now (the watcher does this on its own)."""
    await _services(request).catalog.versions.sync(request.match_info["tenant"])
    return web.json_response({"ok": True})


async def revoke_key(request: web.Request) -> web.Response:
    """Revoke an API key by its id (never by the key itself: it would be in a URL)."""
    store, key_id = _services(request).store, request.match_info["key_id"]

    def found() -> dict[str, Any] | None:  # a tenant's key or a service key
        return next((k for k in store.list_keys() + store.list_service_keys() if k["key_id"] == key_id), None)

    key = found()
    if key is None:
        raise APIError(404, f"no key with id {key_id!r}", param="key_id", code="key_not_found")
    if key["revoked_at"]:
        raise APIError(409, f"key {key_id} was revoked at {key['revoked_at']}", param="key_id")
    tenant, _ = await _services(request).writer.call(Store.revoke_key, key_id, actor=peer_user(request))
    revoked = found()
    revoked_at = revoked["revoked_at"] if revoked else None
    return web.json_response({"key_id": key_id, "tenant": tenant, "revoked_at": revoked_at})


async def residency(request: web.Request) -> web.Response:
    """Where each adapter lives now (gpu / cpu / disk), with the plan that sized the engine."""
    services, sizes = _services(request), request.app[PLAN]
    versions = services.catalog.versions
    running = versions.running_by_version()
    rows = [
        {
            "tenant": adapter.tenant,
            "version": adapter.version,
            "tier": placed.tier,
            "pinned": placed.pinned,
            "last_used": placed.last_used,
            "size_bytes": adapter.size_bytes,
            "running": running[placed.name],
        }
        for placed, adapter in request.app[OVERVIEW].residency().values()
    ]
    gpu = await asyncio.to_thread(gpu_memory)  # NVML blocks: never on the event loop
    return web.json_response(
        {
            "plan": dataclasses.asdict(sizes),
            "kept_resident": [r.tenant for r in services.store.routes() if r.keep_resident],
            "pinnable_slots": versions.pinnable_slots,
            "gpu": dataclasses.asdict(gpu) if gpu else None,
            "counts": {tier: sum(r["tier"] == tier for r in rows) for tier in ("gpu", "cpu", "disk")},
            "adapters": rows,
        }
    )


async def export(request: web.Request) -> web.Response:
    """Merge a tenant's adapter into the base model as one GGUF (plus an Ollama Modelfile).

    Body: `{"version": null, "quant": "f16", "name": null, "overwrite": false}`, all optional: the
    active version, f16, `<tenant>-<version>-<quant>.gguf`, an existing file kept. The file goes
    into the exports directory and nowhere else: `name` is a file name, never a path. One export
    at a time, off the event loop. Every export, and every refused one, is in the audit log."""
    services = _services(request)
    tenant, actor = tenant_of(request), peer_user(request)
    body = await read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise bad_request("body must be an object with version, quant, name and overwrite")

    async def refuse(error: APIError) -> APIError:
        attempt = {k: str(v)[:200] for k, v in body.items() if k in ("version", "quant", "name", "out")}
        change = Change({}, attempt | {"refused": error.message[:300]})
        await services.writer.call(Store.audit, actor, "export_refused", tenant, change)
        return error

    version, quant, name = body.get("version"), body.get("quant", "f16"), body.get("name")
    overwrite = body.get("overwrite", False)
    if "out" in body:
        raise await refuse(
            bad_request(
                "out is not accepted: exports go into the exports directory; give name, a file name", "out"
            )
        )
    if version is not None and not isinstance(version, str):
        raise await refuse(bad_request("version must be a string or null", "version"))
    if quant not in EXPORT_QUANTS:
        raise await refuse(bad_request(f"quant must be one of {', '.join(EXPORT_QUANTS)}", "quant"))
    if not isinstance(overwrite, bool):
        raise await refuse(bad_request("overwrite must be true or false", "overwrite"))
    if name is not None:
        try:
            check_export_name(name)
        except ValueError as exc:
            raise await refuse(bad_request(f"name {exc}", "name")) from None
    try:
        adapter = tenant_adapter(services.store, tenant, version)
    except StoreError as exc:
        raise await refuse(APIError(409, str(exc), param="version")) from None
    name = name or Exporter.default_name(adapter, quant)
    async with request.app[EXPORT_LOCK]:
        try:
            result = await asyncio.to_thread(
                request.app[EXPORTER].into_exports, adapter, quant, name, overwrite=overwrite
            )
        except ExportRefused as exc:
            raise await refuse(APIError(409, str(exc), param="name")) from None
        except (AdapterError, ConversionError) as exc:
            raise await refuse(APIError(409, str(exc), param="quant")) from None
        except OSError as exc:
            raise await refuse(APIError(507, f"cannot write the export: {exc}", param="name")) from None
    done = {"version": adapter.version, "quant": quant, "name": name, "size_bytes": result.size_bytes}
    await services.writer.call(
        Store.audit, actor, "export", tenant, Change({}, done | {"sha256": result.sha256})
    )
    return web.json_response(
        {"tenant": adapter.tenant, "version": adapter.version}
        | {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}
    )


# -- tenant policies and the audit log -------------------------------------------------------------


def policy_report(services: Services, tenant: str) -> dict[str, Any]:
    """A tenant's policy: effective, its own values (the rest are defaults), and its quota now."""
    admission = services.admission
    return {
        "tenant": tenant,
        "policy": admission.policy_view(tenant),
        "own": admission.policies.own(tenant),
        "quota": admission.quota_view(tenant),
        "load": dataclasses.asdict(admission.load().get(tenant) or TenantLoad(0, 0))
        | {"virtual_tokens": round(admission.scheduler.counters().get(tenant, 0.0), 1)},
        "box": {
            "running": admission.running,
            "queued": admission.queued,
            "max_running": admission.scheduler.max_running,
        },
    }


def _known_tenant(services: Services, tenant: str) -> None:
    if services.store.get_tenant(tenant) is None:
        raise APIError(404, f"no tenant named {tenant!r}", param="tenant")


async def get_policy(request: web.Request) -> web.Response:
    services, tenant = _services(request), tenant_of(request)
    _known_tenant(services, tenant)
    return web.json_response(policy_report(services, tenant))


async def set_policy(request: web.Request) -> web.Response:
    """`{"rpm": 60, "tpm": null, ..., "reset": ["weight"]}`: set values (null: no limit), or reset
    them to the config's defaults. Applies to the tenant's next request."""
    services, tenant = _services(request), tenant_of(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad_request("body must be an object of policy fields, and `reset`: a list of fields")
    values = dict(body)
    reset = values.pop("reset", [])
    if not isinstance(reset, list) or not all(isinstance(field, str) for field in reset):
        raise bad_request("reset must be a list of policy field names", "reset")
    _known_tenant(services, tenant)
    try:
        _, after = await services.writer.call(
            Store.set_policy, tenant, values, reset, actor=peer_user(request)
        )
    except PolicyError as exc:
        raise bad_request(str(exc), exc.field) from exc
    services.admission.policies.update(tenant, after)
    return web.json_response(policy_report(services, tenant))


async def tenant_removed(request: web.Request) -> web.Response:
    """`lorabox tenant remove` has removed the tenant from the database: the daemon forgets its
    quota use and policy, so that a tenant given the name later inherits nothing."""
    services, tenant = _services(request), tenant_of(request)
    if services.store.get_tenant(tenant) is not None:
        raise APIError(409, f"tenant {tenant!r} is still there (or was added again)", param="tenant")
    services.admission.quota.forget(tenant)
    services.admission.policies.update(tenant, {})
    return web.json_response({"forgotten": tenant})


async def audit_log(request: web.Request) -> web.Response:
    """`?tenant=acme&limit=100`: operator actions, newest first."""
    try:
        limit = min(int(request.query.get("limit", "100")), 10_000)
    except ValueError as exc:
        raise bad_request("limit must be an integer", "limit") from exc
    rows = _services(request).store.audit_log(request.query.get("tenant") or None, limit)
    return web.json_response({"audit": rows})


def build_admin_app(
    services: Services, sizes: Plan, exporter: Exporter, overview: Overview
) -> web.Application:
    app = web.Application(middlewares=[openai_errors, store_errors], client_max_size=1 << 20)
    app[SERVICES] = services
    app[OVERVIEW] = overview
    app[FEED] = EventFeed(services.store)
    app[PLAN] = sizes
    app[EXPORTER] = exporter
    app[EXPORT_LOCK] = asyncio.Lock()
    app[MAX_BODY_BYTES] = 1 << 20
    app.router.add_get("/admin/status", status)
    app.router.add_get("/admin/adapters", adapters)
    app.router.add_get("/admin/tenants", tenants)
    app.router.add_get("/admin/tenants/{tenant}", tenant)
    app.router.add_get("/admin/stream", stream)
    app.router.add_get("/admin/events", events)
    app.router.add_get("/admin/usage", usage)
    app.router.add_get("/admin/residency", residency)
    app.router.add_post("/admin/tenants/{tenant}/activate", activate)
    app.router.add_post("/admin/tenants/{tenant}/canary", canary)
    app.router.add_post("/admin/tenants/{tenant}/resident", resident)
    app.router.add_post("/admin/tenants/{tenant}/sync", sync)
    app.router.add_post("/admin/tenants/{tenant}/accept", accept)
    app.router.add_post("/admin/tenants/{tenant}/export", export)
    app.router.add_get("/admin/tenants/{tenant}/policy", get_policy)
    app.router.add_post("/admin/tenants/{tenant}/policy", set_policy)
    app.router.add_post("/admin/tenants/{tenant}/removed", tenant_removed)
    app.router.add_get("/admin/audit", audit_log)
    app.router.add_post("/admin/keys/{key_id}/revoke", revoke_key)
    return app
