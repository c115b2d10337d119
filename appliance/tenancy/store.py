"""The box's state in one SQLite file: tenants, API key hashes, adapter versions, usage, events.

The CLI and the daemon open the same file (WAL mode), so `lorabox key revoke` takes effect on
the very next request without talking to the daemon. The daemon's event loop only reads it; its
writes go through one writer thread (tenancy/writer.py) and the usage ledger's (tenancy/ledger.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from ..errors import StoreError, StoreUnavailable
from ..names import is_tenant_name, natural_key
from . import auditchain
from .audit import Change, local_user
from .migrations import migrate
from .policy import check_fields, describe, parse_values

KEY_PREFIX = "lbx"
USAGE_COLUMNS = (
    "uid", "box_id", "ts", "tenant", "key_id", "model", "adapter_version", "endpoint", "engine", "status",
    "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms", "price_in", "price_out",
    "tier", "batch_id",
)  # fmt: skip
"""A usage row as `lorabox usage --rows` exports it, and `lorabox usage --from` reads it back."""
USAGE_COLUMNS_ADDED = ("tier", "batch_id")
"""Columns exports made before them lack: read back as NULL (interactive, no batch)."""
BUSY_TIMEOUT_MS = 5000
"""How long a connection waits for another one's write lock by default (the CLI's); the daemon's
writers wait less, or not at all (tenancy/writer.py, tenancy/ledger.py)."""
# SQLite's primary result codes (sqlite3.h) of the failures a write may meet.
_BUSY, _LOCKED, _READONLY, _IOERR, _FULL, _CANTOPEN = 5, 6, 8, 10, 13, 14


def unavailable(exc: sqlite3.Error, database: Path | str) -> StoreUnavailable:
    """What a failed write means for whoever asked, in one line: busy (retry), or why not."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (_BUSY, _LOCKED):
        return StoreUnavailable(
            f"the state database {database} is busy: another program holds its write lock "
            "(an open sqlite3 session or a backup?); retry in a moment",
            busy=True,
        )
    if code == _FULL:
        problem = f"the disk is full ({exc}); free space on it"
    elif code in (_READONLY, _IOERR, _CANTOPEN):
        problem = f"{exc} (a full, read-only or failing disk?)"
    else:
        problem = str(exc)
    return StoreUnavailable(f"the state database {database} cannot be written: {problem}", busy=False)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    allow_base_model: bool
    disabled: bool
    created_at: str


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    tenant: str
    """The tenant a tenant key belongs to; a service key's name."""
    plaintext: str
    """Shown once, never stored."""


@dataclass(frozen=True)
class KeyHolder:
    """Who an active key is: a tenant's own key, or a service key acting for some tenants."""

    key_id: str
    kind: str
    """`tenant` or `service`."""
    tenant: str = ""
    """A tenant key's tenant."""
    service: str = ""
    """A service key's name."""
    tenants: tuple[str, ...] | None = None
    """The tenants a service key may act for; None: every tenant."""
    rpm: int | None = None
    tpm: int | None = None
    """A service key's own limits, on top of each tenant's (None: none)."""

    def may_act_for(self, tenant: str) -> bool:
        if self.kind == "tenant":
            return tenant == self.tenant
        return self.tenants is None or tenant in self.tenants


@dataclass(frozen=True)
class AdapterVersion:
    tenant: str
    version: str
    path: str
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    state: str = "ready"  # ready | refused | held (strict_base_match: trained on another base)
    reason: str = ""
    base_model: str = ""  # the base the adapter names (base_model_name_or_path)
    note: str = ""  # what an operator should know of a version that serves: another base

    @property
    def engine_name(self) -> str:
        """One engine adapter name per version *and content*: no cache outlives the weights."""
        return f"{self.tenant}@{self.version}#{self.sha256[:12]}"

    @property
    def label(self) -> str:
        return f"{self.tenant}@{self.version}"

    def to_row(self) -> dict[str, Any]:
        return self.__dict__ | {"target_modules": json.dumps(list(self.target_modules))}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AdapterVersion:
        fields = {k: row[k] for k in cls.__dataclass_fields__}
        fields["target_modules"] = tuple(json.loads(row["target_modules"] or "[]"))
        fields["reason"] = row["reason"] or ""
        fields["base_model"] = row["base_model"] or ""
        fields["note"] = row["note"] or ""
        return cls(**fields)


@dataclass(frozen=True)
class Route:
    tenant: str
    active_version: str | None = None
    pinned_version: str | None = None
    canary_version: str | None = None
    canary_percent: int = 0
    keep_resident: bool = False


def _pins(route: Route) -> tuple[object, ...]:
    return (route.pinned_version, route.canary_version, route.canary_percent, route.keep_resident)


class Store:
    def __init__(self, db: sqlite_utils.Database):
        self.db = db
        migrate(db)

    @classmethod
    @contextmanager
    def open(cls, path: Path | str) -> Iterator[Store]:
        store = cls.connect(path)
        try:
            yield store
        finally:
            store.db.close()

    @classmethod
    def connect(cls, path: Path | str, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> Store:
        try:
            if str(path) != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite_utils.Database(path)
            if str(path) != ":memory:":
                db.enable_wal()
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            db.execute("PRAGMA foreign_keys = ON")
            return cls(db)
        except sqlite3.Error as exc:
            raise StoreError(str(unavailable(exc, path))) from exc
        except OSError as exc:
            raise StoreError(f"cannot open the state database {path}: {exc}") from exc

    @contextmanager
    def writing(self) -> Iterator[None]:
        """One transaction that takes the write lock first (BEGIN IMMEDIATE), for a batch of writes
        from a connection other than the loop's. A plain BEGIN that reads before it writes fails
        at once with "database is locked" when another connection committed in between (WAL);
        this one waits its turn (busy_timeout) instead. A COMMIT that fails (a full disk) leaves
        the transaction open: it is rolled back too, so the connection can be used again."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.conn.in_transaction:  # an error may have ended it already
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def box_id(self, configured: str = "") -> str:
        """This box's id: the `box_id` setting when set, else the one its database was made with."""
        if configured:
            return configured
        row = self.db.execute("select id from box order by created_at limit 1").fetchone()
        return str(row[0])

    # -- tenants ------------------------------------------------------------------------------

    def add_tenant(self, name: str, *, allow_base_model: bool = False, actor: str | None = None) -> Tenant:
        if not is_tenant_name(name):
            raise StoreError(
                f"invalid tenant name {name!r}: use 1-63 characters of a-z, 0-9, '_' and '-', "
                "starting with a letter or digit"
            )
        with self.writing():  # one transaction: all of it, or nothing
            if self.get_tenant(name):
                raise StoreError(f"tenant {name!r} already exists")
            self.db.table("tenants").insert(
                {"name": name, "allow_base_model": int(allow_base_model), "disabled": 0, "created_at": _now()}
            )
            self.record_event("tenant_added", tenant=name)
            self.audit(actor, "tenant_add", name, Change.of({}, {"allow_base_model": allow_base_model}))
            tenant = self.get_tenant(name)
            assert tenant is not None
            return tenant

    def get_tenant(self, name: str) -> Tenant | None:
        rows = list(self.db.table("tenants").rows_where("name = ?", [name]))
        if not rows:
            return None
        row = rows[0]
        return Tenant(row["name"], bool(row["allow_base_model"]), bool(row["disabled"]), row["created_at"])

    def list_tenants(self) -> list[Tenant]:
        return [
            Tenant(r["name"], bool(r["allow_base_model"]), bool(r["disabled"]), r["created_at"])
            for r in self.db.table("tenants").rows_where(order_by="name")
        ]

    # -- API keys -----------------------------------------------------------------------------

    def _new_key(self) -> tuple[str, str]:
        """A fresh (key id, plaintext), the id unused by either kind of key."""
        while True:
            key_id = secrets.token_hex(4)
            if not self._key_rows(key_id):
                return key_id, f"{KEY_PREFIX}-{key_id}-{secrets.token_urlsafe(32)}"

    def _key_rows(self, key_id: str) -> list[tuple[str, dict[str, Any]]]:
        """The rows (with their table) of a key, by public id or full key."""
        return [
            (table, row)
            for table in ("api_keys", "service_keys")
            for row in self.db.table(table).rows_where(
                "key_id = ? or key_hash = ?", [key_id, hash_key(key_id)]
            )
        ]

    def issue_key(self, tenant: str, *, actor: str | None = None) -> IssuedKey:
        with self.writing():  # one transaction: all of it, or nothing
            if not self.get_tenant(tenant):
                raise StoreError(f"no tenant named {tenant!r}")
            key_id, plaintext = self._new_key()
            self.db.table("api_keys").insert(
                {"key_id": key_id, "tenant": tenant, "key_hash": hash_key(plaintext), "created_at": _now()}
            )
            self.record_event("key_issued", tenant=tenant, detail=key_id)
            self.audit(
                actor, "key_issue", tenant, Change({}, {f"key {key_id}": "active"}), key=(key_id, "tenant")
            )
            return IssuedKey(key_id, tenant, plaintext)

    def issue_service_key(
        self,
        name: str,
        tenants: list[str] | None,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        actor: str | None = None,
    ) -> IssuedKey:
        """A key that is no tenant's own, for `tenants` (None: every tenant, also those added later).
        Audited once per tenant it reaches ("*": all)."""
        if not is_tenant_name(name):
            raise StoreError(f"invalid service name {name!r}: use 1-63 characters of a-z, 0-9, '_' and '-'")
        with self.writing():  # one transaction: all of it, or nothing
            for tenant in tenants or []:
                if not self.get_tenant(tenant):
                    raise StoreError(f"no tenant named {tenant!r}")
            key_id, plaintext = self._new_key()
            scope = None if tenants is None else json.dumps(sorted(set(tenants)))
            self.db.table("service_keys").insert(
                {
                    "key_id": key_id,
                    "name": name,
                    "key_hash": hash_key(plaintext),
                    "tenants": scope,
                    "rpm": rpm,
                    "tpm": tpm,
                    "created_at": _now(),
                }
            )
            limits = {"rpm": rpm, "tpm": tpm}
            after = {f"service key {key_id}": f"active ({name})"} | {k: v for k, v in limits.items() if v}
            for tenant in sorted(set(tenants)) if tenants is not None else ["*"]:
                self.record_event("key_issued", tenant=tenant if tenant != "*" else "", detail=key_id)
                self.audit(actor, "key_issue", tenant, Change({}, after), key=(key_id, "service"))
            return IssuedKey(key_id, name, plaintext)

    def import_key(self, tenant: str, plaintext: str, *, actor: str | None = None) -> str:
        """Accept a key issued on another box (several boxes serve the same tenants, docs/scaling.md):
        only its hash is stored, under the id it carries. Returns the key id."""
        with self.writing():  # one transaction: all of it, or nothing
            if not self.get_tenant(tenant):
                raise StoreError(f"no tenant named {tenant!r}")
            match = re.fullmatch(rf"{KEY_PREFIX}-([0-9a-f]{{8}})-[A-Za-z0-9_-]{{32,}}", plaintext)
            if match is None:
                raise StoreError(f"not a lorabox key (expected {KEY_PREFIX}-<8 hex digits>-<secret>)")
            key_id = match.group(1)
            existing = [row for _, row in self._key_rows(key_id)]
            if existing:
                same = existing[0]["key_hash"] == hash_key(plaintext) and existing[0].get("tenant") == tenant
                raise StoreError(f"key {key_id} is {'already here' if same else 'taken by another key'}")
            self.db.table("api_keys").insert(
                {"key_id": key_id, "tenant": tenant, "key_hash": hash_key(plaintext), "created_at": _now()}
            )
            self.record_event("key_imported", tenant=tenant, detail=key_id)
            self.audit(
                actor, "key_import", tenant, Change({}, {f"key {key_id}": "active"}), key=(key_id, "tenant")
            )
            return key_id

    def revoke_key(
        self, key_id: str, *, actor: str | None = None, revoked_at: str | None = None
    ) -> tuple[str, str]:
        """Revoke by public id (or the full key); returns (tenant, key id). `revoked_at`: when it was
        revoked on another box (a revocation that reached this one from the fleet)."""
        with self.writing():  # one transaction: all of it, or nothing
            rows = self._key_rows(key_id)
            if not rows:
                raise StoreError(f"no key with id {key_id!r}")
            table, row = rows[0]
            if table == "service_keys":
                if not row["revoked_at"]:
                    self._revoke_service_key(row, actor=actor, revoked_at=revoked_at)
                return f"service {row['name']}", str(row["key_id"])
            if not row["revoked_at"]:
                self.mark_revoked(row["key_id"], row["tenant"], actor=actor, revoked_at=revoked_at)
            return str(row["tenant"]), str(row["key_id"])

    def mark_revoked(self, key_id: str, tenant: str, *, actor: str | None, revoked_at: str | None) -> None:
        """Revoke an active key, with its event and audit row, in the caller's transaction."""
        self.db.table("api_keys").update(key_id, {"revoked_at": revoked_at or _now()})
        self.record_event("key_revoked", tenant=tenant, detail=key_id)
        key = f"key {key_id}"
        self.audit(
            actor, "key_revoke", tenant, Change({key: "active"}, {key: "revoked"}), key=(key_id, "tenant")
        )

    def _revoke_service_key(self, row: dict[str, Any], *, actor: str | None, revoked_at: str | None) -> None:
        key_id = str(row["key_id"])
        self.db.table("service_keys").update(key_id, {"revoked_at": revoked_at or _now()})
        key = f"service key {key_id}"
        for tenant in json.loads(row["tenants"]) if row["tenants"] is not None else ["*"]:
            self.record_event("key_revoked", tenant=tenant if tenant != "*" else "", detail=key_id)
            self.audit(
                actor,
                "key_revoke",
                tenant,
                Change({key: "active"}, {key: "revoked"}),
                key=(key_id, "service"),
            )

    def list_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        where, args = ("tenant = ?", [tenant]) if tenant else (None, [])
        return [
            {k: r[k] for k in ("key_id", "tenant", "created_at", "revoked_at")}
            for r in self.db.table("api_keys").rows_where(where, args, order_by="created_at")
        ]

    def list_service_keys(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Service keys (those that reach `tenant`, when given), tenants shown as `acme,globex` or `*`."""
        found = []
        for r in self.db.table("service_keys").rows_where(order_by="created_at"):
            tenants = None if r["tenants"] is None else list(json.loads(r["tenants"]))
            if tenant is not None and tenants is not None and tenant not in tenants:
                continue
            shown = "*" if tenants is None else ",".join(tenants)
            found.append({k: r[k] for k in ("key_id", "name", "rpm", "tpm", "created_at", "revoked_at")})
            found[-1]["tenants"] = shown
        return found

    def key_holder(self, plaintext: str) -> KeyHolder | None:
        """Who an active key is (a tenant's own key of an enabled tenant, or a service key), or None.
        The stored hash is compared in constant time."""
        owner = self.key_owner(plaintext)
        if owner is not None:
            return KeyHolder(owner[1], "tenant", tenant=owner[0])
        presented = hash_key(plaintext)
        row = self.db.execute(
            "select key_hash, key_id, name, tenants, rpm, tpm from service_keys "
            "where key_hash = ? and revoked_at is null",
            [presented],
        ).fetchone()
        if row is None or not hmac.compare_digest(row[0], presented):
            return None
        tenants = None if row[3] is None else tuple(json.loads(row[3]))
        return KeyHolder(str(row[1]), "service", service=str(row[2]), tenants=tenants, rpm=row[4], tpm=row[5])

    def key_owner(self, plaintext: str) -> tuple[str, str] | None:
        """(tenant, key id) of an active key, or None. The stored hash is compared in constant time."""
        presented = hash_key(plaintext)
        row = self.db.execute(
            "select k.key_hash, k.tenant, k.key_id from api_keys k join tenants t on t.name = k.tenant "
            "where k.key_hash = ? and k.revoked_at is null and t.disabled = 0",
            [presented],
        ).fetchone()
        if row is None or not hmac.compare_digest(row[0], presented):
            return None
        return str(row[1]), str(row[2])

    def tenant_for_key(self, plaintext: str) -> str | None:
        """The tenant an active key belongs to, or None."""
        owner = self.key_owner(plaintext)
        return owner[0] if owner else None

    # -- adapter versions ---------------------------------------------------------------------

    def register_adapter(self, adapter: AdapterVersion) -> bool:
        """Insert or update (tenant, version); returns True when something changed."""
        existing = self.get_adapter(adapter.tenant, adapter.version)
        if existing == adapter:
            return False
        row = adapter.to_row() | {"registered_at": _now()}
        if existing:
            self.db.table("adapter_versions").update(self._adapter_id(adapter), row)
        else:
            self.db.table("adapter_versions").insert(row)
        kind = {"ready": "adapter_registered", "held": "adapter_held"}.get(adapter.state, "adapter_refused")
        self.record_event(kind, tenant=adapter.tenant, version=adapter.version, detail=adapter.reason)
        if adapter.note and adapter.state == "ready":
            self.record_event(
                "adapter_base_mismatch", tenant=adapter.tenant, version=adapter.version, detail=adapter.note
            )
        return True

    def accept_base(self, adapter: AdapterVersion, *, actor: str | None = None) -> None:
        """Serve this version (these bytes) although it names another base (strict_base_match)."""
        with self.writing():  # one transaction: all of it, or nothing
            self.db.table("base_acceptances").upsert(
                {
                    "tenant": adapter.tenant,
                    "version": adapter.version,
                    "sha256": adapter.sha256,
                    "accepted_at": _now(),
                    "actor": actor or local_user(),
                },
                pk=("tenant", "version", "sha256"),
            )
            self.record_event(
                "adapter_base_accepted", tenant=adapter.tenant, version=adapter.version, detail=adapter.note
            )
            change = Change({adapter.version: "held"}, {adapter.version: "accepted on another base"})
            self.audit(actor, "adapter_accept", adapter.tenant, change)

    def base_accepted(self, adapter: AdapterVersion) -> bool:
        row = self.db.execute(
            "select 1 from base_acceptances where tenant = ? and version = ? and sha256 = ?",
            [adapter.tenant, adapter.version, adapter.sha256],
        ).fetchone()
        return row is not None

    def _adapter_id(self, adapter: AdapterVersion) -> int:
        row = self.db.execute(
            "select id from adapter_versions where tenant = ? and version = ?",
            [adapter.tenant, adapter.version],
        ).fetchone()
        return int(row[0])

    def get_adapter(self, tenant: str, version: str) -> AdapterVersion | None:
        rows = list(
            self.db.table("adapter_versions").rows_where("tenant = ? and version = ?", [tenant, version])
        )
        return AdapterVersion.from_row(rows[0]) if rows else None

    def adapters(self, tenant: str | None = None) -> list[AdapterVersion]:
        where, args = ("tenant = ?", [tenant]) if tenant else (None, [])
        found = [
            AdapterVersion.from_row(r) for r in self.db.table("adapter_versions").rows_where(where, args)
        ]
        return sorted(found, key=lambda a: (a.tenant, natural_key(a.version)))

    def remove_adapter(self, tenant: str, version: str, *, detail: str = "") -> None:
        self.db.execute("delete from adapter_versions where tenant = ? and version = ?", [tenant, version])
        self.record_event("adapter_removed", tenant=tenant, version=version, detail=detail)

    def active_adapter(self, tenant: str) -> AdapterVersion | None:
        """The newest ready version (natural sort)."""
        ready = [a for a in self.adapters(tenant) if a.state == "ready"]
        return ready[-1] if ready else None

    # -- routes: which version serves a tenant ------------------------------------------------

    def route(self, tenant: str) -> Route:
        rows = list(self.db.table("routes").rows_where("tenant = ?", [tenant]))
        if not rows:
            return Route(tenant)
        row = rows[0]
        return Route(
            tenant,
            active_version=row["active_version"] or None,
            pinned_version=row["pinned_version"] or None,
            canary_version=row["canary_version"] or None,
            canary_percent=row["canary_percent"] or 0,
            keep_resident=bool(row["keep_resident"]),
        )

    def routes(self) -> list[Route]:
        return [self.route(row["tenant"]) for row in self.db.table("routes").rows_where(order_by="tenant")]

    def save_route(self, route: Route, *, pins_at: str | None = None) -> None:
        """Save a tenant's route. When its pins change (pinned version, canary, kept resident), they
        are stamped with `pins_at` (an import's), else now: `lorabox fleet import` keeps the newer."""
        before = self.route(route.tenant)
        if pins_at is None and _pins(before) != _pins(route):
            pins_at = _now()
        stamp = {"pins_at": pins_at} if pins_at is not None else {}
        self.db.table("routes").upsert(
            {
                "tenant": route.tenant,
                "active_version": route.active_version,
                "pinned_version": route.pinned_version,
                "canary_version": route.canary_version,
                "canary_percent": route.canary_percent,
                "keep_resident": int(route.keep_resident),
                "updated_at": _now(),
            }
            | stamp,
            pk="tenant",
            alter=False,
        )

    def set_keep_resident(self, tenant: str, keep: bool) -> bool:
        """The operator's "keep this tenant's adapter in a GPU slot"; records an event if it changed."""
        with self.writing():  # one transaction: all of it, or nothing
            route = self.route(tenant)
            if route.keep_resident == keep:
                return False
            self.save_route(dataclasses.replace(route, keep_resident=keep))
            self.record_event("residency_kept" if keep else "residency_released", tenant=tenant)
            return True

    # -- policies -----------------------------------------------------------------------------

    def policy_values(self, tenant: str) -> dict[str, Any]:
        """The tenant's own policy values (checked when they were set); absent ones follow the defaults."""
        row = self.db.execute("select policy from tenant_policies where tenant = ?", [tenant]).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def all_policy_values(self) -> dict[str, dict[str, Any]]:
        return {
            str(tenant): dict(json.loads(values))
            for tenant, values in self.db.execute("select tenant, policy from tenant_policies")
        }

    def policy_marker(self) -> tuple[int, str]:
        """Changes whenever any tenant's policy does: a cheap check before reloading them all."""
        count, latest = self.db.execute("select count(*), max(updated_at) from tenant_policies").fetchone()
        return int(count), str(latest or "")

    def set_policy(
        self,
        tenant: str,
        values: dict[str, Any],
        reset: list[str] | tuple[str, ...] = (),
        *,
        actor: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Set some of a tenant's policy values (checked here) and reset others to the defaults, in one
        transaction with its audit row. Returns the tenant's own values before and after."""
        checked = parse_values(values)
        check_fields(reset)
        with self.writing():
            if not self.get_tenant(tenant):
                raise StoreError(f"no tenant named {tenant!r}")
            before = self.policy_values(tenant)
            after = {k: v for k, v in before.items() if k not in reset} | checked
            now = _now()
            self.db.table("tenant_policies").upsert(
                {"tenant": tenant, "policy": json.dumps(after), "updated_at": now, "set_at": now}, pk="tenant"
            )
            fields = dict.fromkeys([*before, *after])
            shown = [
                {f: describe(f, side[f]) if f in side else "(default)" for f in fields}
                for side in (before, after)
            ]
            self.audit(actor, "tenant_set", tenant, Change.of(*shown))
        return before, after

    def remove_tenant(self, name: str, *, purge: bool = False, actor: str | None = None) -> dict[str, Any]:
        """Remove a tenant in one transaction: its keys revoked (each audited) and deleted, its
        policy, routes, pins and adapter registry gone, so that the name starts clean when reused.
        Its usage rows are kept under an archived name (`acme~removed-<time>`, which no tenant can
        take; retention applies to them as to any row) or, with `purge`, deleted with its monthly
        summaries. Its batch jobs and files' rows are deleted. Events and the audit log keep their
        history. Returns what was done."""
        with self.writing():
            if not self.get_tenant(name):
                raise StoreError(f"no tenant named {name!r}")
            revoked = [k["key_id"] for k in self.list_keys(name) if not k["revoked_at"]]
            for key_id in revoked:
                self.mark_revoked(key_id, name, actor=actor, revoked_at=None)
            # Its batch jobs and uploaded files too (the CLI deletes the files' bytes): a tenant given
            # the name later must not list, read or run them.
            self.db.execute(
                "delete from batch_lines where batch_id in (select id from batches where tenant = ?)", [name]
            )
            batches = self.db.execute("delete from batches where tenant = ?", [name]).rowcount
            files = self.db.execute("delete from files where tenant = ?", [name]).rowcount
            for table in ("api_keys", "tenant_policies", "routes", "adapter_versions", "base_acceptances"):
                self.db.execute(f"delete from {table} where tenant = ?", [name])  # noqa: S608 (ours)
            # Service keys that named it no longer do: a new tenant of that name is not theirs to reach
            # (a key for every tenant, `tenants` NULL, reaches it as it reaches any new tenant).
            for row in self.db.execute("select key_id, tenants from service_keys where tenants is not null"):
                if name in (listed := json.loads(row[1])):
                    scope = json.dumps([t for t in listed if t != name])
                    self.db.execute("update service_keys set tenants = ? where key_id = ?", [scope, row[0]])
            rows = self.db.execute("select count(*) from usage where tenant = ?", [name]).fetchone()[0]
            if purge:
                self.db.execute("delete from usage where tenant = ?", [name])
                self.db.execute("delete from usage_monthly where tenant = ?", [name])
                usage = f"{rows} rows deleted"
            else:
                archived = f"{name}~removed-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
                self.db.execute("update usage set tenant = ? where tenant = ?", [archived, name])
                self.db.execute("update usage_monthly set tenant = ? where tenant = ?", [archived, name])
                usage = f"{rows} rows kept as {archived}"
            self.db.execute("delete from tenants where name = ?", [name])
            done = {
                "keys revoked": len(revoked),
                "usage": usage,
                "purge": purge,
                "batches": batches,
                "files": files,
            }
            self.record_event("tenant_removed", tenant=name, detail=usage)
            self.audit(
                actor, "tenant_remove", name, Change({"tenant": "present"}, {"tenant": "removed"} | done)
            )
        return done

    # -- the audit log --------------------------------------------------------------------------

    def audit(
        self,
        actor: str | None,
        action: str,
        tenant: str,
        change: Change,
        *,
        key: tuple[str, str] | None = None,
    ) -> None:
        """One audit row, chained onto the last (tenancy/auditchain.py): in the caller's transaction,
        which holds the write lock (`writing()`), else in one of its own. `key`: the (key id, key
        kind) the action was about."""
        with contextlib.nullcontext() if self.db.conn.in_transaction else self.writing():
            table = self.db.table("audit_log").insert(
                {"ts": _now(), "actor": actor or local_user(), "action": action, "tenant": tenant}
                | change.columns()
                | ({"key_id": key[0], "key_kind": key[1]} if key else {})
            )
            auditchain.seal(self.db, int(table.last_rowid or 0))

    def audit_log(self, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first."""
        where, args = ("tenant = ?", [tenant]) if tenant else (None, [])
        return list(self.db.table("audit_log").rows_where(where, args, order_by="id desc", limit=limit))

    # -- usage and events ---------------------------------------------------------------------

    def record_usage(self, rows: list[dict[str, Any]]) -> None:
        """Rows whose `uid` is already booked are left out: a row is booked once however often it
        is written (tenancy/spool.py)."""
        if not rows:
            return
        columns = list(dict.fromkeys(column for row in rows for column in row))
        names = ", ".join(f'"{column}"' for column in columns)
        with self.db.atomic():  # a savepoint inside `writing()`, else a transaction of its own
            self.db.conn.executemany(
                f"insert into usage ({names}) values ({', '.join('?' * len(columns))}) "  # noqa: S608 (our columns)
                "on conflict (uid) do nothing",
                [[row.get(column) for column in columns] for row in rows],
            )

    def usage_summary(self, tenant: str | None = None) -> list[dict[str, Any]]:
        cursor = self.db.execute(
            "select tenant, count(*) as requests, sum(prompt_tokens) as prompt_tokens, "
            "sum(completion_tokens) as completion_tokens from usage "
            "where ? is null or tenant = ? group by tenant order by tenant",
            [tenant, tenant],
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def usage_report(
        self,
        tenant: str | None = None,
        since: str | None = None,
        until: str | None = None,
        by: str = "",
        box: str = "",
    ) -> list[dict[str, Any]]:
        """Requests, tokens and cost per tenant and tier (`default`, `flex`, `batch`; and per `day`
        or `month` when `by` says so) from `since` up to `until` (ISO 8601 UTC), and the boxes that
        served them (`box` for rows that name none: this box's own, booked before rows carried it).
        Cost uses the prices each request was served at."""
        period = {"": "''", "day": "substr(ts, 1, 10)", "month": "substr(ts, 1, 7)"}[by]
        # Rows deleted by retention count as their monthly summaries, dated the 1st of the month.
        cursor = self.db.execute(
            "with rows as (select ts, tenant, coalesce(tier, 'default') as tier, 1 as requests, "  # noqa: S608 (fixed)
            "prompt_tokens, completion_tokens, "
            "(prompt_tokens * coalesce(price_in, 0) + completion_tokens * coalesce(price_out, 0)) / 1e6 "
            "as cost, coalesce(box_id, :box) as box from usage "
            "union all select month || '-01T00:00:00.000+00:00', tenant, tier, requests, prompt_tokens, "
            "completion_tokens, cost, coalesce(nullif(box_id, ''), :box) from usage_monthly) "
            f"select {period} as period, tenant, tier, sum(requests) as requests, "
            "sum(prompt_tokens) as prompt_tokens, sum(completion_tokens) as completion_tokens, "
            "sum(cost) as cost, replace(group_concat(distinct box), ',', '+') as box_id "
            "from rows where (:tenant is null or tenant = :tenant) "
            "and (:since is null or ts >= :since) and (:until is null or ts < :until) "
            "group by period, tenant, tier order by period, tenant, tier = 'batch', tier",
            {"tenant": tenant, "since": since, "until": until, "box": box},
        )
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def usage_rows(
        self, tenant: str | None = None, since: str | None = None, until: str | None = None, box: str = ""
    ) -> list[dict[str, Any]]:
        """Every ledger row in the window, as `lorabox usage --rows` exports them (USAGE_COLUMNS;
        `box` for rows that name no box)."""
        names = ", ".join("coalesce(box_id, :box) as box_id" if c == "box_id" else c for c in USAGE_COLUMNS)
        cursor = self.db.execute(
            f"select {names} from usage where (:tenant is null or tenant = :tenant) "  # noqa: S608 (ours)
            "and (:since is null or ts >= :since) and (:until is null or ts < :until) order by ts, id",
            {"tenant": tenant, "since": since, "until": until, "box": box},
        )
        return [dict(zip(USAGE_COLUMNS, row, strict=True)) for row in cursor.fetchall()]

    def tokens_since(self, since: str) -> dict[str, int]:
        """Prompt + completion tokens booked per tenant from `since` (ISO 8601 UTC) on."""
        rows = self.db.execute(
            "select tenant, sum(prompt_tokens + completion_tokens) from usage where ts >= ? group by tenant",
            [since],
        )
        return {str(tenant): int(tokens or 0) for tenant, tokens in rows}

    def last_events(self, kind: str) -> dict[str, str]:
        """When each tenant last had an event of this kind."""
        rows = self.db.execute("select tenant, max(ts) from events where kind = ? group by tenant", [kind])
        return {str(tenant): str(ts) for tenant, ts in rows}

    def record_event(self, kind: str, *, tenant: str = "", version: str = "", detail: str = "") -> None:
        self.db.table("events").insert(
            {"ts": _now(), "kind": kind, "tenant": tenant, "version": version, "detail": detail}
        )

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.db.table("events").rows_where(order_by="id desc", limit=limit))

    def events_after(self, event_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Events newer than `event_id`, oldest first."""
        return list(self.db.table("events").rows_where("id > ?", [event_id], order_by="id", limit=limit))
