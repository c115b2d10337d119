"""The registry of adapter versions, kept in step with the drop folder, off the event loop.

Everything that grows with a tenant's folder (listing it, fingerprinting and judging each
version, hashing the weights, writing rows and events) runs on a thread of its own with its own
SQLite connection, as the usage ledger's writes do: a folder of 10,000 versions costs the event
loop one await. Writes are committed BATCH at a time, so the database is never locked for long
(the loop's connection, the ledger and the CLI write to it too).

What one tenant's folder may put in the registry is bounded, because operators read it
(`lorabox adapters list`, `lorabox events`) and the server reads a tenant's rows on every change:

* the newest MAX_SERVABLE servable versions are registered, and any older one the tenant's route
  names (pinned, canary, active); older folders are not even hashed, as the newest one serves;
* the newest MAX_LISTED_REFUSALS refused versions are listed with their reasons (a row and an
  event, or an event alone where the names break the contract); the others are summed up in one
  `adapter_refused` event whenever that summary changes.

So 10,000 empty folders are 20 rows and one event, and the tenant keeps its good version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterError
from ..names import is_tenant_name, is_version_name, natural_key
from ..tenancy.store import AdapterVersion, Store
from .drops import (
    AdapterLimits,
    BaseModelInfo,
    Fingerprint,
    fingerprint,
    judge,
    printable,
    tenant_folders,
    version_folders,
)
from .pacing import Pacer

log = logging.getLogger(__name__)

MAX_SERVABLE = 100
MAX_LISTED_REFUSALS = 20
BATCH = 200


@dataclass(frozen=True)
class _Judged:
    fingerprint: Fingerprint
    verdict: AdapterVersion


class FolderRegistry:
    """Brings one tenant's registry rows in line with its folder. Not thread-safe: one caller."""

    def __init__(
        self,
        adapters_dir: Path,
        base: BaseModelInfo,
        limits: AdapterLimits,
        *,
        strict_base_match: bool = False,
    ):
        self.adapters_dir, self.base, self.limits = adapters_dir, base, limits
        self.strict_base_match = strict_base_match
        self._judged: dict[str, dict[str, _Judged]] = {}  # tenant → version → last verdict
        self._reported: dict[str, str] = {}  # tenant → summary (or listing error) last recorded

    def reconcile(self, store: Store, tenant: str, stopping: Callable[[], bool] = lambda: False) -> None:
        """Judge what changed in `<adapters_dir>/<tenant>/` and record it; stops early if `stopping()`."""
        try:
            folders = version_folders(self.adapters_dir, tenant)
        except AdapterError as exc:  # the registry stays as it is: unreadable is not empty
            self._report(store, tenant, str(exc))
            return
        keep = self._named_by_route(store, tenant) if is_tenant_name(tenant) else set()
        judged = self._judged.get(tenant, {})
        raw: dict[str, _Judged] = {}  # the check's verdicts, kept for the next time
        current: dict[str, _Judged] = {}  # what is registered (held where held), newest first
        fresh: set[str] = set()
        servable = 0
        tenant_dir = os.path.join(self.adapters_dir, tenant)
        real_root = os.path.realpath(self.adapters_dir)  # once, not once per version
        pace = Pacer()
        for version in sorted(folders, key=natural_key, reverse=True):
            if stopping():
                return
            pace()
            if servable >= MAX_SERVABLE and version not in keep:
                continue
            mark = fingerprint(os.path.join(tenant_dir, version))
            entry = judged.get(version)
            if entry is None or entry.fingerprint != mark:
                verdict = judge(
                    tenant, version, self.adapters_dir, self.base, self.limits, real_root=real_root
                )
                entry = _Judged(mark, verdict)
                fresh.add(version)
            raw[version] = entry
            verdict = entry.verdict
            if verdict.note and self.strict_base_match:
                # Held until accepted: decided anew each time, as an acceptance changes no file.
                verdict = self._held(store, verdict)
                if version not in fresh and store.get_adapter(tenant, version) != verdict:
                    fresh.add(version)
            current[version] = _Judged(mark, verdict)
            servable += verdict.state == "ready"
        self._judged[tenant] = raw
        self._write(store, tenant, current, fresh, set(folders))

    @staticmethod
    def _held(store: Store, verdict: AdapterVersion) -> AdapterVersion:
        """A version trained on another base, under strict_base_match: held unless accepted."""
        if verdict.state != "ready" or store.base_accepted(verdict):
            return verdict
        reason = (
            f"{verdict.note}; strict_base_match holds it until `lorabox adapters accept "
            f"{verdict.tenant} {verdict.version}`"
        )
        return dataclasses.replace(verdict, state="held", reason=reason)

    def _write(
        self, store: Store, tenant: str, current: dict[str, _Judged], fresh: set[str], on_disk: set[str]
    ) -> None:
        refused = [(version, e.verdict) for version, e in current.items() if e.verdict.state != "ready"]
        listed, unlisted = refused[:MAX_LISTED_REFUSALS], refused[MAX_LISTED_REFUSALS:]
        rows = {version: e.verdict for version, e in current.items() if e.verdict.state == "ready"}
        changes: list[Callable[[], object]] = []
        for version, verdict in listed:
            if is_tenant_name(tenant) and is_version_name(version):
                rows[version] = verdict
            if version in fresh:
                log.warning(
                    "%s adapter %s/%s: %s", verdict.state, verdict.tenant, verdict.version, verdict.reason
                )
                if version not in rows:  # no row can hold these names: the event alone says why
                    changes.append(
                        functools.partial(
                            store.record_event,
                            "adapter_refused",
                            tenant=verdict.tenant,
                            version=verdict.version,
                            detail=verdict.reason,
                        )
                    )
        for version, verdict in rows.items():
            if version in fresh and verdict.state == "ready" and verdict.note:
                log.warning("adapter %s/%s serves, but was %s", verdict.tenant, verdict.version, verdict.note)
        existing = {a.version for a in store.adapters(tenant)} if is_tenant_name(tenant) else set()
        changes += [
            functools.partial(store.register_adapter, verdict)
            for version, verdict in rows.items()
            if version in fresh or version not in existing
        ]
        for version in sorted(existing - rows.keys()):
            detail = "still on disk; no longer listed (see the summary)" if version in on_disk else ""
            changes.append(functools.partial(store.remove_adapter, tenant, version, detail=detail))
        summary = _summary(unlisted, skipped=len(on_disk) - len(current))
        if self._reported.get(tenant, "") != summary:
            self._reported[tenant] = summary
            if summary:
                log.warning("adapters of %s: %s", printable(tenant), summary)
                changes.append(
                    functools.partial(
                        store.record_event, "adapter_refused", tenant=printable(tenant), detail=summary
                    )
                )
        for start in range(0, len(changes), BATCH):
            with store.writing():
                for change in changes[start : start + BATCH]:
                    change()

    def _report(self, store: Store, tenant: str, reason: str) -> None:
        if self._reported.get(tenant) != reason:
            self._reported[tenant] = reason
            log.warning("adapters of %s: %s", printable(tenant), reason)
            store.record_event("adapter_refused", tenant=printable(tenant), detail=reason)

    @staticmethod
    def _named_by_route(store: Store, tenant: str) -> set[str]:
        route = store.route(tenant)
        return {v for v in (route.pinned_version, route.canary_version, route.active_version) if v}


def _summary(unlisted: list[tuple[str, AdapterVersion]], skipped: int) -> str:
    parts = []
    if unlisted:
        oldest = unlisted[-1][1]
        parts.append(
            f"{len(unlisted)} more refused version folders not listed (only the newest "
            f"{MAX_LISTED_REFUSALS} refusals are), e.g. {oldest.version}: {oldest.reason}"
        )
    if skipped:
        parts.append(f"{skipped} version folders older than the newest {MAX_SERVABLE} servable ones ignored")
    return "; ".join(parts)


class RegistryThread:
    """Runs a FolderRegistry on a thread of its own, with its own connection to the database."""

    def __init__(self, database: Path, registry: FolderRegistry):
        self.database, self.registry = database, registry
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-registry")
        self._store: Store | None = None  # opened and used on that thread only
        self._stopping = threading.Event()

    async def reconcile(self, tenant: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._reconcile, tenant)

    async def tenants(self) -> list[str]:
        """The tenant folders on disk."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, tenant_folders, self.registry.adapters_dir
        )

    async def close(self) -> None:
        """Stop a reconcile under way at its next version, then close the connection."""
        self._stopping.set()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown()

    def _reconcile(self, tenant: str) -> None:
        if self._stopping.is_set():
            return
        if self._store is None:
            self._store = Store.connect(self.database)
        self.registry.reconcile(self._store, tenant, self._stopping.is_set)

    def _close(self) -> None:
        if self._store is not None:
            self._store.db.close()
            self._store = None
