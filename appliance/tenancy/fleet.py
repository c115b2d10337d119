"""One set of tenants, keys and policies for several boxes: `lorabox fleet export` and `fleet import`.

The export is one JSON document: every tenant (whether it may use the base model), its own policy
values and when they were set, its pins (pinned version, canary, kept in a GPU slot) and when,
and every API key as its SHA-256 (never the key itself: a key shown once stays with whoever it was
shown to) with when it was made and when revoked. Importing merges it into this box's database, item
by item, and does nothing twice:

- a tenant or key that is not here is added; nothing here is removed (a box may hold its own);
- a key revoked in the document is revoked here too, with the document's time; a revocation is
  never undone by an import;
- a tenant's policy, and separately its pins, take the document's values only when they were set
  later than this box's: an older export never overwrites a newer policy. Times are the UTC clock
  of the box where a value was set (boxes' clocks in sync with NTP order changes made seconds apart).
- a key id here with another hash, or a key of another tenant, is a conflict: reported, left alone.

`version` is the document format's; a newer format than this lorabox reads is refused whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import PolicyError, StoreError
from ..names import is_tenant_name, is_version_name
from .audit import Change
from .policy import describe, parse_values
from .store import Route, Store

FORMAT = "lorabox-fleet"
VERSION = 1
KEY_ID = re.compile(r"[0-9a-f]{8}")
KEY_HASH = re.compile(r"[0-9a-f]{64}")
MAX_BYTES = 64 << 20  # a document this large is 100,000s of tenants: more is not one


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _pins(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "pinned_version": row.get("pinned_version") or None,
        "canary_version": row.get("canary_version") or None,
        "canary_percent": int(row.get("canary_percent") or 0),
        "keep_resident": bool(row.get("keep_resident")),
    }


def export(store: Store, box_id: str) -> dict[str, Any]:
    """This box's tenants, policies, pins and key hashes, as `lorabox fleet export` prints them."""
    policies = {
        str(r[0]): (json.loads(r[1]), r[2])
        for r in store.db.execute("select tenant, policy, coalesce(set_at, updated_at) from tenant_policies")
    }
    routes = {str(r["tenant"]): r for r in store.db.table("routes").rows}
    tenants = []
    for tenant in store.list_tenants():
        policy, policy_at = policies.get(tenant.name, (None, None))
        route = routes.get(tenant.name)
        tenants.append(
            {
                "name": tenant.name,
                "allow_base_model": tenant.allow_base_model,
                "disabled": tenant.disabled,
                "created_at": tenant.created_at,
                "policy": policy,
                "policy_set_at": policy_at,
                "pins": _pins(route) if route and route.get("pins_at") else None,
                "pins_at": route.get("pins_at") if route else None,
            }
        )
    keys = [
        {k: row[k] for k in ("key_id", "tenant", "key_hash", "created_at", "revoked_at")}
        for row in store.db.table("api_keys").rows_where(order_by="created_at")
    ]
    return {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": _now(),
        "box_id": box_id,
        "tenants": tenants,
        "keys": keys,
    }


@dataclass
class Changes:
    """What importing a document changes here, and what it leaves alone (and why)."""

    tenants: list[dict[str, Any]] = field(default_factory=list)
    keys: list[dict[str, Any]] = field(default_factory=list)
    revocations: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    pins: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    """Values left as they are here because this box's are newer."""
    conflicts: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.tenants or self.keys or self.revocations or self.policies or self.pins)

    @property
    def touched(self) -> list[str]:
        """Tenants the daemon should look at again (new ones, changed pins)."""
        return sorted({t["name"] for t in self.tenants} | {p["tenant"] for p in self.pins})

    def summary(self) -> list[str]:
        lines = [
            f"tenants: {len(self.tenants)} added; keys: {len(self.keys)} added, "
            f"{len(self.revocations)} revoked; policies: {len(self.policies)} updated; "
            f"pins: {len(self.pins)} updated; {len(self.kept)} kept (newer here)"
        ]
        lines += [f"  kept: {text}" for text in self.kept]
        lines += [f"  conflict: {text}" for text in self.conflicts]
        return lines


def _stamp(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise StoreError(f"{what}: not a time")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise StoreError(f"{what}: not an ISO 8601 time: {value[:40]!r}") from None
    if moment.tzinfo is None:
        raise StoreError(f"{what}: the time has no time zone: {value[:40]!r}")
    return value


def _newer(theirs: str | None, ours: str | None) -> bool:
    if theirs is None:
        return False
    if ours is None:
        return True
    return datetime.fromisoformat(theirs) > datetime.fromisoformat(ours)


def read(text: str) -> dict[str, Any]:
    """A fleet document, checked at the top level; StoreError says what is wrong."""
    if len(text) > MAX_BYTES:
        raise StoreError(f"the fleet document is larger than {MAX_BYTES >> 20} MiB")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"not a fleet document (JSON): {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StoreError(
            f'not a fleet document: no "format": "{FORMAT}" (make one with lorabox fleet export)'
        )
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise StoreError("not a fleet document: no format version")
    if version > VERSION:
        raise StoreError(
            f"the fleet document is format {version}; this lorabox reads up to {VERSION}: upgrade it first"
        )
    for part in ("tenants", "keys"):
        if not isinstance(data.get(part), list):
            raise StoreError(f"the fleet document has no list of {part}")
    return data


def plan(store: Store, data: dict[str, Any]) -> Changes:
    """What importing `data` (checked by `read`) would change here; StoreError for a malformed item."""
    changes = Changes()
    here = {t.name: t for t in store.list_tenants()}
    policies = {
        str(r[0]): (json.loads(r[1]), r[2])
        for r in store.db.execute("select tenant, policy, coalesce(set_at, updated_at) from tenant_policies")
    }
    routes = {str(r["tenant"]): r for r in store.db.table("routes").rows}
    names: set[str] = set()
    for item in data["tenants"]:
        if not isinstance(item, dict) or not is_tenant_name(str(item.get("name", ""))):
            raise StoreError(f"a tenant without a valid name: {str(item)[:80]}")
        name = str(item["name"])
        names.add(name)
        if name not in here:
            changes.tenants.append(
                {
                    "name": name,
                    "allow_base_model": bool(item.get("allow_base_model")),
                    "disabled": bool(item.get("disabled")),
                    "created_at": _stamp(item.get("created_at"), f"{name}: created_at") or _now(),
                }
            )
        _plan_policy(changes, name, item, policies.get(name))
        _plan_pins(changes, name, item, routes.get(name))
    keys = {str(r["key_id"]): r for r in store.db.table("api_keys").rows}
    for item in data["keys"]:
        if not isinstance(item, dict) or not KEY_ID.fullmatch(str(item.get("key_id", ""))):
            raise StoreError(f"a key without a valid key id: {str(item)[:80]}")
        key_id, tenant = str(item["key_id"]), str(item.get("tenant", ""))
        if not KEY_HASH.fullmatch(str(item.get("key_hash", ""))):
            raise StoreError(f"key {key_id}: not a SHA-256 hash (a fleet document holds no key itself)")
        revoked_at = _stamp(item.get("revoked_at"), f"key {key_id}: revoked_at")
        if tenant not in here and tenant not in names:
            changes.conflicts.append(
                f"key {key_id}: its tenant {tenant!r} is neither here nor in the document"
            )
            continue
        ours = keys.get(key_id)
        if ours is None:
            created = _stamp(item.get("created_at"), f"key {key_id}: created_at") or _now()
            changes.keys.append(
                {
                    "key_id": key_id,
                    "tenant": tenant,
                    "key_hash": item["key_hash"],
                    "created_at": created,
                    "revoked_at": revoked_at,
                }
            )
        elif ours["key_hash"] != item["key_hash"] or ours["tenant"] != tenant:
            changes.conflicts.append(
                f"key {key_id}: here it is another key (or another tenant's); left alone"
            )
        elif revoked_at and not ours["revoked_at"]:
            changes.revocations.append({"key_id": key_id, "tenant": tenant, "revoked_at": revoked_at})
    return changes


def _plan_policy(
    changes: Changes, name: str, item: dict[str, Any], ours: tuple[dict[str, Any], str] | None
) -> None:
    theirs, theirs_at = item.get("policy"), _stamp(item.get("policy_set_at"), f"{name}: policy_set_at")
    if theirs is None:
        return
    if not isinstance(theirs, dict):
        raise StoreError(f"{name}: the policy is not an object")
    try:
        values = parse_values(theirs)
    except PolicyError as exc:
        raise StoreError(f"{name}: {exc}") from None
    if ours is not None and values == ours[0]:
        return
    if ours is not None and not _newer(theirs_at, ours[1]):
        changes.kept.append(f"{name}'s policy (set here {ours[1]}, in the document {theirs_at})")
        return
    changes.policies.append(
        {"tenant": name, "before": ours[0] if ours else {}, "after": values, "set_at": theirs_at or _now()}
    )


def _plan_pins(changes: Changes, name: str, item: dict[str, Any], route: dict[str, Any] | None) -> None:
    theirs, theirs_at = item.get("pins"), _stamp(item.get("pins_at"), f"{name}: pins_at")
    if theirs is None:
        return
    if not isinstance(theirs, dict):
        raise StoreError(f"{name}: the pins are not an object")
    pins = _pins(theirs)
    for field_name in ("pinned_version", "canary_version"):
        if pins[field_name] is not None and not is_version_name(str(pins[field_name])):
            raise StoreError(f"{name}: {field_name} is not a version name")
    if not 0 <= pins["canary_percent"] <= 100:
        raise StoreError(f"{name}: canary_percent must be 0-100")
    ours = _pins(route or {})
    if pins == ours:
        return
    if route is not None and not _newer(theirs_at, route.get("pins_at")):
        changes.kept.append(f"{name}'s pins (set here {route.get('pins_at')}, in the document {theirs_at})")
        return
    changes.pins.append({"tenant": name, "before": ours, "after": pins, "pins_at": theirs_at or _now()})


def apply(store: Store, changes: Changes, actor: str | None = None) -> None:
    """Write the changes in one transaction, each with its audit row (action `fleet_import`)."""
    with store.writing():
        for tenant in changes.tenants:
            store.db.table("tenants").insert(tenant)
            store.record_event("tenant_added", tenant=tenant["name"], detail="fleet import")
            store.audit(actor, "fleet_import", tenant["name"], Change.of({}, {"tenant": "added"}))
        for key in changes.keys:
            store.db.table("api_keys").insert(key)
            store.record_event("key_imported", tenant=key["tenant"], detail=key["key_id"])
            state = "revoked" if key["revoked_at"] else "active"
            store.audit(actor, "fleet_import", key["tenant"], Change({}, {f"key {key['key_id']}": state}))
        for revocation in changes.revocations:
            store.mark_revoked(
                revocation["key_id"], revocation["tenant"], actor=actor, revoked_at=revocation["revoked_at"]
            )
        for policy in changes.policies:
            store.db.table("tenant_policies").upsert(
                {
                    "tenant": policy["tenant"],
                    "policy": json.dumps(policy["after"]),
                    "updated_at": _now(),  # what the daemon watches: changed here, now
                    "set_at": policy["set_at"],
                },
                pk="tenant",
            )
            fields = dict.fromkeys([*policy["before"], *policy["after"]])
            shown = [
                {f: describe(f, side[f]) if f in side else "(default)" for f in fields}
                for side in (policy["before"], policy["after"])
            ]
            store.audit(actor, "fleet_import", policy["tenant"], Change.of(*shown))
        for pins in changes.pins:
            route = store.route(pins["tenant"])
            after = pins["after"]
            store.save_route(
                Route(
                    route.tenant,
                    active_version=route.active_version,
                    pinned_version=after["pinned_version"],
                    canary_version=after["canary_version"],
                    canary_percent=after["canary_percent"],
                    keep_resident=after["keep_resident"],
                ),
                pins_at=pins["pins_at"],
            )
            store.audit(actor, "fleet_import", pins["tenant"], Change.of(pins["before"], after))
