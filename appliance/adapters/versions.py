"""Which version of each tenant's adapter serves, and switching without dropping a request.

`sync(tenant)` reconciles one tenant's folder with the store and the engine:
  1. the registry (registry.py, off the event loop) judges the versions whose files changed (a
     copy still in progress is refused as incomplete, then accepted once the file is whole) and
     unregisters vanished ones;
  2. the desired version is the operator's pin if it is servable, else the newest valid one;
  3. it is loaded into the engine first (warm) and only then made active, so the first request
     after a switch pays no load; the previous version is retired and unloaded once the
     requests already running on it have finished (they hold a lease on it).

A canary sends a percentage of a tenant's requests to a candidate version, sticky per `user`
(or request id) when the client gives one.

A tenant kept resident (`lorabox residency pin`) has its active version pinned in a GPU slot; a
new version is pinned when it takes over, and the old one's pin goes when it is unloaded. One slot
always stays unpinned, for every other tenant.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from ..engines.base import AdapterRef, Engine
from ..errors import AdapterError, EngineDead, StoreError, StoreUnavailable
from ..names import is_tenant_name, natural_key
from ..tenancy.store import AdapterVersion, Route, Store
from ..tenancy.writer import StoreWriter
from .drops import printable
from .registry import RegistryThread
from .residency import ResidencyTracker

log = logging.getLogger(__name__)


def _version_of(engine_name: str) -> str:
    """`tenant@version#sha12` → version."""
    return engine_name.partition("@")[2].split("#")[0]


def engine_ref(adapter: AdapterVersion) -> AdapterRef:
    return AdapterRef(adapter.engine_name, adapter.path)


class VersionManager:
    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        engine: Engine,
        registry: RegistryThread,
        residency: ResidencyTracker,
    ):
        # Reads from `store` (the event loop's connection); every write through `writer`.
        self.store, self.writer, self.engine, self.registry = store, writer, engine, registry
        self.residency = residency
        self.requests_per_version: Counter[tuple[str, str]] = Counter()
        self._active: dict[str, AdapterVersion] = {}
        self._canary: dict[str, tuple[AdapterVersion, int]] = {}
        self._loaded: dict[str, AdapterRef] = {}  # engine name → ref, warm in the engine
        self._inflight: Counter[str] = Counter()
        self._retired: set[str] = set()
        self._pins: dict[str, str] = {}  # engine name → tenant, pinned in the engine
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the request path ---------------------------------------------------------------------

    def active(self, tenant: str) -> AdapterVersion | None:
        return self._active.get(tenant)

    def choose(self, tenant: str, sticky: str | None) -> AdapterVersion | None:
        """The version that serves this request: the active one, or the canary for its share."""
        active = self._active.get(tenant)
        canary = self._canary.get(tenant)
        if active is None or canary is None:
            return active
        candidate, percent = canary
        if sticky:
            bucket = int.from_bytes(hashlib.sha256(f"{tenant}\0{sticky}".encode()).digest()[:4], "big") % 100
        else:
            bucket = secrets.randbelow(100)
        return candidate if bucket < percent else active

    @contextmanager
    def lease(self, adapter: AdapterVersion | None) -> Iterator[None]:
        """Held for the whole request: a retired version is unloaded only once none are left."""
        if adapter is None:
            yield
            return
        name = adapter.engine_name
        self._inflight[name] += 1
        self.requests_per_version[(adapter.tenant, adapter.version)] += 1
        self.residency.used(name, time.time())
        try:
            yield
        finally:
            self._inflight[name] -= 1
            if self._inflight[name] <= 0:
                del self._inflight[name]
                if name in self._retired:
                    self._unload_soon(name)

    # -- reconciling folder, store and engine -------------------------------------------------

    async def sync_all(self) -> None:
        """Every tenant on disk, registered or routed; one tenant's failure is not the others'."""
        on_disk = set(await self.registry.tenants())
        registered = {a.tenant for a in self.store.adapters()}
        routed = {r.tenant for r in self.store.routes()}
        for tenant in sorted(on_disk | registered | routed):
            try:
                await self.sync(tenant)
            except EngineDead:
                raise
            except Exception:
                log.exception("could not bring tenant %s's adapters up to date", printable(tenant))

    async def sync(self, tenant: str) -> None:
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            await self.registry.reconcile(tenant)  # the folder → the registry, off the loop
            if is_tenant_name(tenant):
                await self._apply_route(tenant)

    def _ready(self, tenant: str) -> dict[str, AdapterVersion]:
        return {a.version: a for a in self.store.adapters(tenant) if a.state == "ready"}

    async def _apply_route(self, tenant: str) -> None:
        route = self.store.route(tenant)
        ready = self._ready(tenant)
        newest = max(ready.values(), key=lambda a: natural_key(a.version), default=None)
        desired = ready.get(route.pinned_version or "", newest)
        current = self._active.get(tenant)

        if desired is None and current is not None:
            del self._active[tenant]
            self._retire(current)
            await self.writer.event(
                "adapter_deactivated",
                tenant=tenant,
                version=current.version,
                detail="no servable version left",
            )
        elif desired is not None and (current is None or current.engine_name != desired.engine_name):
            await self._switch(tenant, current, desired)

        active = self._active.get(tenant)
        try:
            await self.writer.call(
                Store.save_route,
                dataclasses.replace(route, active_version=active.version if active else None),
            )
        except StoreUnavailable as exc:  # it serves as decided; the record follows at the next sync
            log.warning("%s: the active version is not recorded yet: %s", tenant, exc)
        await self._apply_canary(tenant, route, ready)
        await self._apply_residency(tenant, route)

    async def _apply_residency(self, tenant: str, route: Route) -> None:
        active = self._active.get(tenant)
        wanted = active.engine_name if route.keep_resident and active else None
        for name in [n for n, t in self._pins.items() if t == tenant and n != wanted]:
            if name in self._retired or name not in self._loaded:
                continue  # it loses its pin when it is unloaded, once drained
            await self.engine.unpin_adapter(self._loaded[name])
            del self._pins[name]
            self.residency.unpin(name)
            await self.writer.event("residency_unpinned", tenant=tenant, version=_version_of(name))
        if wanted is None or active is None or wanted in self._pins:
            return
        try:
            others = {t for t in self._pins.values() if t != tenant}
            if len(others) + 1 > self.pinnable_slots:
                raise AdapterError(
                    f"{len(others)} other tenants are pinned and {self.residency.max_loras} GPU slots "
                    "exist; one must stay free for all other tenants"
                )
            await self.engine.pin_adapter(self._loaded[wanted])
        except AdapterError as exc:
            log.warning("%s stays unpinned: %s", tenant, exc)
            await self.writer.event(
                "residency_pin_failed", tenant=tenant, version=active.version, detail=str(exc)
            )
            return
        self._pins[wanted] = tenant
        self.residency.pin(wanted)
        await self.writer.event("residency_pinned", tenant=tenant, version=_version_of(wanted))

    async def _switch(self, tenant: str, current: AdapterVersion | None, desired: AdapterVersion) -> None:
        if not await self._warm(desired):
            return  # refused by the engine: the current version keeps serving
        self._active[tenant] = desired
        rolled_back = current is not None and natural_key(desired.version) < natural_key(current.version)
        await self.writer.event(
            "adapter_rolled_back" if rolled_back else "adapter_activated",
            tenant=tenant,
            version=desired.version,
            detail=f"was {current.version}" if current else "",
        )
        log.info("%s now serves %s", tenant, desired.label)
        if current is not None:
            self._retire(current)

    async def _apply_canary(self, tenant: str, route: Route, ready: dict[str, AdapterVersion]) -> None:
        previous = self._canary.pop(tenant, None)
        candidate = ready.get(route.canary_version or "")
        if candidate is not None and route.canary_percent > 0 and await self._warm(candidate):
            self._canary[tenant] = (candidate, route.canary_percent)
        if previous is not None:
            self._retire(previous[0])  # a no-op while it still serves

    async def _warm(self, adapter: AdapterVersion) -> bool:
        name = adapter.engine_name
        self._retired.discard(name)
        if name in self._loaded:
            return True
        try:
            await self.engine.load_adapter(engine_ref(adapter))
        except AdapterError as exc:
            log.error("%s", exc)
            refused = dataclasses.replace(adapter, state="refused", reason=str(exc))
            try:
                await self.writer.call(Store.register_adapter, refused)
            except StoreUnavailable as unrecorded:  # refused all the same; the next sync records it
                log.warning("%s: the refusal is not recorded yet: %s", adapter.label, unrecorded)
            return False
        self._loaded[name] = engine_ref(adapter)
        self.residency.loaded(name)
        return True

    def _in_use(self, name: str) -> bool:
        serving = {a.engine_name for a in self._active.values()}
        serving |= {a.engine_name for a, _ in self._canary.values()}
        return name in serving

    def _retire(self, adapter: AdapterVersion) -> None:
        name = adapter.engine_name
        if name not in self._loaded or self._in_use(name):
            return
        self._retired.add(name)
        if not self._inflight[name]:
            self._unload_soon(name)

    def _unload_soon(self, name: str) -> None:
        task = asyncio.get_running_loop().create_task(self._unload(name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, name: str) -> None:
        if name not in self._retired or self._inflight[name] or self._in_use(name):
            return
        self._retired.discard(name)
        ref = self._loaded.pop(name)
        await self.engine.unload_adapter(ref)  # a pin goes with it
        self._pins.pop(name, None)
        self.residency.unloaded(name)
        await self.writer.event("adapter_unloaded", tenant=name.partition("@")[0], version=_version_of(name))
        log.info("unloaded %s after it drained", name)

    # -- operator actions ---------------------------------------------------------------------

    async def activate(self, tenant: str, version: str | None) -> AdapterVersion | None:
        """Pin a version (rollback or hold), or `None` to follow the newest again."""
        if version is not None and version not in self._ready(tenant):
            raise StoreError(f"{tenant}@{version} is not a servable version")
        route = self.store.route(tenant)
        await self.writer.call(Store.save_route, dataclasses.replace(route, pinned_version=version))
        await self.writer.event(
            "adapter_pinned" if version else "adapter_unpinned", tenant=tenant, version=version or ""
        )
        await self.sync(tenant)
        active = self._active.get(tenant)
        if version is not None and (active is None or active.version != version):
            raise StoreError(f"{tenant}@{version} could not be loaded; see `lorabox adapters list`")
        return active

    async def set_canary(self, tenant: str, version: str | None, percent: int) -> None:
        if not 0 <= percent <= 100:
            raise StoreError("canary percent must be between 0 and 100")
        if version is not None and percent > 0 and version not in self._ready(tenant):
            raise StoreError(f"{tenant}@{version} is not a servable version")
        route = self.store.route(tenant)
        cleared = version is None or percent == 0
        await self.writer.call(
            Store.save_route,
            dataclasses.replace(
                route, canary_version=None if cleared else version, canary_percent=0 if cleared else percent
            ),
        )
        await self.writer.event(
            "canary_cleared" if cleared else "canary_set",
            tenant=tenant,
            version=version or "",
            detail="" if cleared else f"{percent}%",
        )
        await self.sync(tenant)

    @property
    def pinnable_slots(self) -> int:
        """How many tenants may be kept resident: every GPU slot but one."""
        return self.residency.max_loras - 1

    async def keep_resident(self, tenant: str, keep: bool) -> str | None:
        """Keep (or stop keeping) a tenant's active adapter in a GPU slot; returns the pinned version."""
        known = self.store.get_tenant(tenant) is not None or tenant in self._active
        if not is_tenant_name(tenant) or not known:
            raise StoreError(f"unknown tenant {tenant!r}")
        route = self.store.route(tenant)
        if keep and not route.keep_resident:
            kept = [r.tenant for r in self.store.routes() if r.keep_resident]
            if len(kept) + 1 > self.pinnable_slots:
                raise StoreError(
                    f"{len(kept)} tenants are kept resident and the engine has {self.residency.max_loras} "
                    "GPU adapter slots; one must stay free for all other tenants. Unpin a tenant, or raise "
                    "max_loras (or the LoRA memory budget) and restart"
                )
        await self.writer.call(Store.set_keep_resident, tenant, keep)
        await self.sync(tenant)
        return self.pinned_version(tenant)

    def pinned_version(self, tenant: str) -> str | None:
        active = self._active.get(tenant)
        return active.version if active and active.engine_name in self._pins else None

    def running_by_version(self) -> Counter[str]:
        """Requests in flight per adapter version (engine name)."""
        return Counter(self._inflight)

    def running_by_tenant(self) -> Counter[str]:
        """Requests in flight per tenant on its adapter versions (a base-model request holds no lease)."""
        running: Counter[str] = Counter()
        for name, count in self._inflight.items():
            running[name.partition("@")[0]] += count
        return running

    def canary(self, tenant: str) -> tuple[str, int] | None:
        entry = self._canary.get(tenant)
        return (entry[0].version, entry[1]) if entry else None

    def loaded_names(self) -> set[str]:
        return set(self._loaded)
