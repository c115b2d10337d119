"""The SQLite store: migrations, tenants, key hashes, adapter versions, usage and events."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from appliance.errors import StoreError
from appliance.tenancy import migrations
from appliance.tenancy.store import AdapterVersion, Store


@pytest.fixture
def store() -> Iterator[Store]:
    store = Store.connect(":memory:")
    yield store
    store.db.close()


def adapter(tenant: str, version: str, state: str = "ready", **changes: Any) -> AdapterVersion:
    registered = AdapterVersion(
        tenant=tenant,
        version=version,
        path=f"/adapters/{tenant}/{version}",
        sha256=hashlib.sha256(f"{tenant}/{version}".encode()).hexdigest(),
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        size_bytes=1234,
        state=state,
        reason="" if state == "ready" else "incomplete safetensors file",
    )
    return dataclasses.replace(registered, **changes)


def active_version(store: Store, tenant: str) -> str | None:
    active = store.active_adapter(tenant)
    return active.version if active else None


def event_kinds(store: Store) -> list[str]:
    return [e["kind"] for e in reversed(store.events())]


# -- migrations ---------------------------------------------------------------------------------


def test_migrations_are_recorded_and_idempotent() -> None:
    db = sqlite_utils.Database(memory=True)
    names = [fn.__name__ for fn in migrations.MIGRATIONS]
    assert migrations.migrate(db) == names
    assert {r["name"] for r in db["_migrations"].rows} == set(names)
    schema = db.schema

    assert migrations.migrate(db) == []
    Store(db)  # the store migrates on open: must be a no-op now
    assert db.schema == schema
    assert db["_migrations"].count == len(names)
    assert {"tenants", "api_keys", "adapter_versions", "usage", "events"} <= set(db.table_names())


def test_migrations_run_only_the_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    db = sqlite_utils.Database(memory=True)
    migrations.migrate(db)

    def m999_extra_column(db: sqlite_utils.Database) -> None:
        db["tenants"].add_column("note", str)

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, m999_extra_column])
    assert migrations.migrate(db) == ["m999_extra_column"]
    assert "note" in db["tenants"].columns_dict
    assert migrations.migrate(db) == []


def test_a_failing_migration_leaves_no_partial_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    db = sqlite_utils.Database(memory=True)
    migrations.migrate(db)

    def m999_fails_half_way(db: sqlite_utils.Database) -> None:
        db["half_done"].create({"id": int}, pk="id")
        raise RuntimeError("disk full")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, m999_fails_half_way])
    with pytest.raises(RuntimeError):
        migrations.migrate(db)
    assert "half_done" not in db.table_names()


# -- tenants ------------------------------------------------------------------------------------


def test_add_tenant(store: Store) -> None:
    tenant = store.add_tenant("acme", allow_base_model=True)
    assert (tenant.name, tenant.allow_base_model, tenant.disabled) == ("acme", True, False)
    assert store.get_tenant("acme") == tenant
    store.add_tenant("globex")
    assert [t.name for t in store.list_tenants()] == ["acme", "globex"]
    assert store.get_tenant("initech") is None


def test_duplicate_tenant_refused(store: Store) -> None:
    store.add_tenant("acme")
    with pytest.raises(StoreError, match="already exists"):
        store.add_tenant("acme")
    assert len(store.list_tenants()) == 1


HOSTILE_NAMES = ["bad name", "café", "../x", "x/y", "Acme", "ACME", "a" * 64, "", "-acme", "_acme", ".acme"]


@pytest.mark.parametrize("name", [*HOSTILE_NAMES, "acme\n", "acme ", "acme\x00"])
def test_hostile_tenant_names_refused(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="invalid tenant name"):
        store.add_tenant(name)
    assert store.list_tenants() == []


@pytest.mark.parametrize("name", ["a", "0", "acme-2", "acme_corp", "a" * 63])
def test_valid_tenant_names_accepted(store: Store, name: str) -> None:
    assert store.add_tenant(name).name == name


# -- keys ---------------------------------------------------------------------------------------


def test_issued_key_resolves_to_its_tenant(store: Store) -> None:
    store.add_tenant("acme")
    store.add_tenant("globex")
    acme, globex = store.issue_key("acme"), store.issue_key("globex")
    assert acme.plaintext != globex.plaintext
    assert acme.key_id in acme.plaintext
    assert store.tenant_for_key(acme.plaintext) == "acme"
    assert store.tenant_for_key(globex.plaintext) == "globex"


def test_issuing_a_key_for_an_unknown_tenant_fails(store: Store) -> None:
    with pytest.raises(StoreError, match="no tenant"):
        store.issue_key("nosuch")


def test_wrong_keys_resolve_to_nothing(store: Store) -> None:
    store.add_tenant("acme")
    key = store.issue_key("acme").plaintext
    last = key[-1]
    near_misses = [
        "",
        " ",
        key[:-1],
        key + "x",
        key[:-1] + ("A" if last != "A" else "B"),
        key.upper(),
        " " + key,
        key + "\n",
        key.split("-", 2)[2],  # the secret part alone
        hashlib.sha256(key.encode()).hexdigest(),  # the stored hash is not a key
        store.list_keys("acme")[0]["key_id"],
    ]
    for wrong in near_misses:
        assert store.tenant_for_key(wrong) is None, wrong
    assert store.tenant_for_key(key) == "acme"


def test_revoked_key_stops_working(store: Store) -> None:
    store.add_tenant("acme")
    first, second = store.issue_key("acme"), store.issue_key("acme")
    assert store.revoke_key(first.key_id) == ("acme", first.key_id)
    assert store.tenant_for_key(first.plaintext) is None
    assert store.tenant_for_key(second.plaintext) == "acme"
    (row,) = [k for k in store.list_keys("acme") if k["key_id"] == first.key_id]
    assert row["revoked_at"]
    # Revoking again is harmless and records nothing new.
    kinds = event_kinds(store)
    assert store.revoke_key(first.key_id) == ("acme", first.key_id)
    assert event_kinds(store) == kinds


def test_revoke_by_full_key(store: Store) -> None:
    store.add_tenant("acme")
    issued = store.issue_key("acme")
    assert store.revoke_key(issued.plaintext) == ("acme", issued.key_id)
    assert store.tenant_for_key(issued.plaintext) is None


@pytest.mark.parametrize("key_id", ["deadbeef", "", "lbx-deadbeef-x"])
def test_revoking_an_unknown_key_fails(store: Store, key_id: str) -> None:
    store.add_tenant("acme")
    issued = store.issue_key("acme")
    with pytest.raises(StoreError, match="no key"):
        store.revoke_key(key_id)
    assert store.tenant_for_key(issued.plaintext) == "acme"


def test_disabled_tenant_keys_resolve_to_nothing(store: Store) -> None:
    tenant = store.add_tenant("acme")
    key = store.issue_key("acme").plaintext
    # There is no store method to disable a tenant yet; the column is what the lookup reads.
    store.db["tenants"].update("acme", {"disabled": 1})
    assert store.get_tenant("acme") == dataclasses.replace(tenant, disabled=True)
    assert store.tenant_for_key(key) is None
    store.db["tenants"].update("acme", {"disabled": 0})
    assert store.tenant_for_key(key) == "acme"


def test_list_keys_never_shows_secrets(store: Store) -> None:
    store.add_tenant("acme")
    store.add_tenant("globex")
    issued = store.issue_key("acme")
    store.issue_key("globex")
    rows = store.list_keys("acme")
    assert [r["key_id"] for r in rows] == [issued.key_id]
    assert issued.plaintext not in repr(rows)
    assert len(store.list_keys()) == 2


def test_database_file_holds_only_key_hashes(tmp_path: Path) -> None:
    db_path = tmp_path / "state" / "lorabox.db"

    def raw_bytes() -> bytes:
        files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
        assert db_path in files
        return b"".join(p.read_bytes() for p in files)

    with Store.open(db_path) as store:
        store.add_tenant("acme")
        store.add_tenant("globex")
        issued = [store.issue_key("acme"), store.issue_key("globex"), store.issue_key("acme")]
        store.revoke_key(issued[2].key_id)
        # While open, the fresh rows live in the -wal file: check it too.
        assert (tmp_path / "state" / "lorabox.db-wal").exists()
        checks = [raw_bytes()]
    checks.append(raw_bytes())

    for blob in checks:
        for key in issued:
            secret = key.plaintext.split("-", 2)[2]
            assert len(secret) >= 40
            assert key.plaintext.encode() not in blob
            assert secret.encode() not in blob
            assert hashlib.sha256(key.plaintext.encode()).hexdigest().encode() in blob

    with Store.open(db_path) as store:
        assert store.tenant_for_key(issued[0].plaintext) == "acme"
        assert store.tenant_for_key(issued[2].plaintext) is None


# -- adapter versions ---------------------------------------------------------------------------


def test_register_and_get_adapter(store: Store) -> None:
    v1 = adapter("acme", "v1")
    assert store.register_adapter(v1) is True
    assert store.get_adapter("acme", "v1") == v1
    assert store.get_adapter("acme", "v2") is None
    assert store.register_adapter(v1) is False  # nothing changed
    refused = adapter("acme", "v2", state="refused", sha256="", rank=0, alpha=0.0, target_modules=())
    assert store.register_adapter(refused) is True
    assert store.register_adapter(refused) is False
    assert store.get_adapter("acme", "v2") == refused


def test_register_adapter_updates_a_changed_version(store: Store) -> None:
    store.register_adapter(adapter("acme", "v1"))
    changed = adapter("acme", "v1", sha256="f" * 64, size_bytes=99)
    assert store.register_adapter(changed) is True
    assert store.get_adapter("acme", "v1") == changed
    assert len(store.adapters("acme")) == 1
    broken = adapter("acme", "v1", state="refused")
    assert store.register_adapter(broken) is True
    assert store.active_adapter("acme") is None


def test_register_adapter_records_events(store: Store) -> None:
    store.register_adapter(adapter("acme", "v1"))
    store.register_adapter(adapter("acme", "v2", state="refused", reason="rank 128 exceeds 64"))
    store.register_adapter(adapter("acme", "v1"))
    events = list(reversed(store.events()))
    assert [(e["kind"], e["version"]) for e in events] == [
        ("adapter_registered", "v1"),
        ("adapter_refused", "v2"),
    ]
    assert events[1]["detail"] == "rank 128 exceeds 64"


@pytest.mark.parametrize(
    ("versions", "newest"),
    [
        (["v1", "v2", "v10", "v9"], "v10"),
        (["1.9", "1.10", "1.2"], "1.10"),
        (["2024-01-31", "2024-02-01", "2023-12-31"], "2024-02-01"),
        (["v1"], "v1"),
        (["a", "b"], "b"),
    ],
)
def test_active_adapter_is_the_newest_by_natural_sort(store: Store, versions: list[str], newest: str) -> None:
    for version in versions:
        store.register_adapter(adapter("acme", version))
    assert active_version(store, "acme") == newest


def test_active_adapter_skips_refused_versions(store: Store) -> None:
    store.register_adapter(adapter("acme", "v2"))
    store.register_adapter(adapter("acme", "v10", state="refused"))
    store.register_adapter(adapter("globex", "v99"))
    active = store.active_adapter("acme")
    assert active is not None
    assert (active.tenant, active.version) == ("acme", "v2")
    assert [a.version for a in store.adapters("acme")] == ["v2", "v10"]
    assert store.active_adapter("initech") is None


def test_active_adapter_none_when_all_refused(store: Store) -> None:
    store.register_adapter(adapter("acme", "v1", state="refused"))
    assert store.active_adapter("acme") is None


def test_remove_adapter(store: Store) -> None:
    store.register_adapter(adapter("acme", "v1"))
    store.register_adapter(adapter("acme", "v2"))
    store.remove_adapter("acme", "v2")
    assert active_version(store, "acme") == "v1"
    assert event_kinds(store)[-1] == "adapter_removed"


def test_engine_name_changes_with_content() -> None:
    a, b = adapter("acme", "v1"), adapter("acme", "v1", sha256="0" * 64)
    assert a.label == b.label == "acme@v1"
    assert a.engine_name != b.engine_name
    assert a.engine_name.startswith("acme@v1#")


# -- usage and events ---------------------------------------------------------------------------


def usage_row(tenant: str, prompt: int, completion: int) -> dict[str, object]:
    return {
        "ts": "2025-01-01T00:00:00.000+00:00",
        "tenant": tenant,
        "model": tenant,
        "adapter_version": "v1",
        "endpoint": "chat",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "finish_reason": "stop",
        "status": 200,
        "latency_ms": 12.5,
    }


def test_usage_summary_sums_per_tenant(store: Store) -> None:
    assert store.usage_summary() == []
    store.record_usage([])
    store.record_usage([usage_row("acme", 10, 5), usage_row("globex", 7, 3), usage_row("acme", 1, 2)])
    assert store.usage_summary() == [
        {"tenant": "acme", "requests": 2, "prompt_tokens": 11, "completion_tokens": 7},
        {"tenant": "globex", "requests": 1, "prompt_tokens": 7, "completion_tokens": 3},
    ]
    assert store.usage_summary("globex") == [
        {"tenant": "globex", "requests": 1, "prompt_tokens": 7, "completion_tokens": 3}
    ]
    assert store.usage_summary("initech") == []


def test_events_for_tenant_and_key_changes(store: Store) -> None:
    store.add_tenant("acme")
    issued = store.issue_key("acme")
    store.revoke_key(issued.key_id)
    events = list(reversed(store.events()))
    assert [(e["kind"], e["tenant"]) for e in events] == [
        ("tenant_added", "acme"),
        ("key_issued", "acme"),
        ("key_revoked", "acme"),
    ]
    assert events[1]["detail"] == events[2]["detail"] == issued.key_id
    assert issued.plaintext not in repr(events)
    assert all(e["ts"] for e in events)
    assert len(store.events(limit=1)) == 1
    assert store.events(limit=1)[0]["kind"] == "key_revoked"


def test_failed_operations_record_no_events(store: Store) -> None:
    with pytest.raises(StoreError):
        store.add_tenant("Bad Name")
    with pytest.raises(StoreError):
        store.issue_key("nosuch")
    with pytest.raises(StoreError):
        store.revoke_key("nosuch")
    assert store.events() == []


def test_keep_resident_is_saved_and_each_change_recorded_once(store):
    store.add_tenant("acme")
    assert store.set_keep_resident("acme", True)
    assert not store.set_keep_resident("acme", True)  # no change, no second event
    assert store.route("acme").keep_resident
    assert store.set_keep_resident("acme", False)
    assert not store.route("acme").keep_resident
    kinds = [e["kind"] for e in store.events(10) if e["kind"].startswith("residency")]
    assert sorted(kinds) == ["residency_kept", "residency_released"]
