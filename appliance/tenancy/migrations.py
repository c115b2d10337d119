"""Schema changes as ordered, named functions, recorded in `_migrations` once applied.

Add a new function at the end; never edit one that has shipped.
"""

from __future__ import annotations

import re
import secrets
import socket
from collections.abc import Callable
from datetime import UTC, datetime

import sqlite_utils

from . import auditchain

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations in order; returns the names applied now."""
    db.table("_migrations").create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
    done = {row["name"] for row in db.table("_migrations").rows}
    applied = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        with db.conn:
            # sqlite3 opens transactions only before DML: begin one so a failing migration
            # leaves no half-made schema behind.
            db.execute("begin")
            fn(db)
            db.table("_migrations").insert({"name": fn.__name__, "applied_at": datetime.now(UTC).isoformat()})
        applied.append(fn.__name__)
    return applied


@migration
def m001_tenants_and_keys(db: sqlite_utils.Database) -> None:
    db.table("tenants").create(
        {"name": str, "allow_base_model": int, "created_at": str, "disabled": int},
        pk="name",
        not_null={"created_at"},
        defaults={"allow_base_model": 0, "disabled": 0},
    )
    # Only a SHA-256 of each key is kept: keys are 256-bit random, so a fast hash is enough and
    # lets the server look a key up by its hash. `key_id` is public and names the key in the CLI.
    db.table("api_keys").create(
        {"key_id": str, "tenant": str, "key_hash": str, "created_at": str, "revoked_at": str},
        pk="key_id",
        foreign_keys=[("tenant", "tenants", "name")],
        not_null={"tenant", "key_hash", "created_at"},
    )
    db.table("api_keys").create_index(["key_hash"], unique=True)


@migration
def m002_adapter_versions(db: sqlite_utils.Database) -> None:
    db.table("adapter_versions").create(
        {
            "id": int,
            "tenant": str,
            "version": str,
            "path": str,
            "sha256": str,
            "rank": int,
            "alpha": float,
            "target_modules": str,  # JSON list
            "size_bytes": int,
            "state": str,  # ready | refused
            "reason": str,  # why it was refused
            "registered_at": str,
        },
        pk="id",
        not_null={"tenant", "version", "path", "state", "registered_at"},
    )
    db.table("adapter_versions").create_index(["tenant", "version"], unique=True)


@migration
def m003_usage_and_events(db: sqlite_utils.Database) -> None:
    db.table("usage").create(
        {
            "id": int,
            "ts": str,
            "tenant": str,
            "model": str,
            "adapter_version": str,
            "endpoint": str,
            "prompt_tokens": int,
            "completion_tokens": int,
            "finish_reason": str,
            "status": int,
            "latency_ms": float,
        },
        pk="id",
    )
    db.table("usage").create_index(["tenant", "ts"])
    db.table("events").create(
        {"id": int, "ts": str, "kind": str, "tenant": str, "version": str, "detail": str},
        pk="id",
    )
    db.table("events").create_index(["ts"])


@migration
def m004_routes(db: sqlite_utils.Database) -> None:
    # Which version serves each tenant. `active_version` is set by the daemon only after the
    # version is warm in the engine; `pinned_version` is the operator's choice (rollback or pin);
    # a canary sends `canary_percent` of the tenant's requests to `canary_version`.
    db.table("routes").create(
        {
            "tenant": str,
            "active_version": str,
            "pinned_version": str,
            "canary_version": str,
            "canary_percent": int,
            "updated_at": str,
        },
        pk="tenant",
        defaults={"canary_percent": 0},
    )


@migration
def m005_keep_resident(db: sqlite_utils.Database) -> None:
    # The operator's "keep this tenant's adapter in a GPU slot" (`lorabox residency pin`).
    db.table("routes").add_column("keep_resident", int, not_null_default=0)


@migration
def m006_usage_billing_fields(db: sqlite_utils.Database) -> None:
    # The billing record: which key, which engine, and the time to the first token.
    db.table("usage").add_column("key_id", str)
    db.table("usage").add_column("engine", str)
    db.table("usage").add_column("ttft_ms", float)


@migration
def m007_policies_audit_prices(db: sqlite_utils.Database) -> None:
    # A tenant's own policy values as a JSON object (tenancy/policy.py): an absent field follows
    # the config's [tenant_defaults], a null one has no limit.
    db.table("tenant_policies").create(
        {"tenant": str, "policy": str, "updated_at": str},
        pk="tenant",
        foreign_keys=[("tenant", "tenants", "name")],
        not_null={"policy", "updated_at"},
    )
    # Every operator action: who, when, on which tenant, and what changed (JSON, before → after).
    db.table("audit_log").create(
        {"id": int, "ts": str, "actor": str, "action": str, "tenant": str, "before": str, "after": str},
        pk="id",
        not_null={"ts", "actor", "action"},
    )
    db.table("audit_log").create_index(["tenant", "id"])
    # The prices in force when a request was served (per million tokens): the bill of a past
    # month does not change when the price does.
    db.table("usage").add_column("price_in", float)
    db.table("usage").add_column("price_out", float)


@migration
def m016_usage_uid(db: sqlite_utils.Database) -> None:
    # Each usage row's own id, given when the request is booked. A row that reached the spool
    # (tenancy/spool.py) is inserted by its uid and ignored when that uid is already there, so a
    # replay repeated after a crash, or of a row whose commit failed ambiguously, books it once.
    # Older rows have none (NULLs do not collide in a unique index).
    db.table("usage").add_column("uid", str)
    db.table("usage").create_index(["uid"], unique=True)


@migration
def m017_adapter_base_names(db: sqlite_utils.Database) -> None:
    # The base model an adapter names (base_model_name_or_path) and, when that is not the served
    # base, a note saying so: the version serves (the shapes fit) but is flagged.
    db.table("adapter_versions").add_column("base_model", str, not_null_default="")
    db.table("adapter_versions").add_column("note", str, not_null_default="")
    # Versions an operator accepted on another base (`lorabox adapters accept`) under
    # strict_base_match: by content, so that changed files are held again.
    db.table("base_acceptances").create(
        {"tenant": str, "version": str, "sha256": str, "accepted_at": str, "actor": str},
        pk=("tenant", "version", "sha256"),
        not_null={"accepted_at"},
    )


@migration
def m022a_box_id(db: sqlite_utils.Database) -> None:
    # Several boxes' ledgers are added up into one bill (docs/scaling.md): each row says which box
    # served it. Older rows have none (they are this box's: exports name it for them).
    db.table("usage").add_column("box_id", str)
    # This box's id, unless the `box_id` setting names one: made once, from the host name and a
    # random part (two boxes cloned from one image still differ once each has made its database).
    host = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:40] or "box"
    db.table("box").create({"id": str, "created_at": str}, pk="id")
    db.table("box").insert(
        {"id": f"{host}-{secrets.token_hex(3)}", "created_at": datetime.now(UTC).isoformat()}
    )
    # Every row gets a uid (those booked before m016 had none), so that merged exports count each
    # row once (`lorabox usage --from`).
    db.execute("update usage set uid = lower(hex(randomblob(16))) where uid is null")


@migration
def m022b_fleet_versions(db: sqlite_utils.Database) -> None:
    # When a tenant's policy values were set, wherever that was: `lorabox fleet import` keeps the
    # newer of two boxes' values, and carries this time over (`updated_at` stays the time of the
    # local write, which the daemon watches for changes).
    db.table("tenant_policies").add_column("set_at", str)
    db.execute("update tenant_policies set set_at = updated_at")
    # The same for a tenant's pins (pinned version, canary, kept resident): set by an operator, or
    # by an import; `updated_at` also moves when the daemon activates a new version.
    db.table("routes").add_column("pins_at", str)


@migration
def m020a_service_keys(db: sqlite_utils.Database) -> None:
    # Keys that are no tenant's own: an agency's backend calls for several tenants with one key and
    # names the tenant per request. `tenants` is a JSON list of the tenants it may act for, NULL for
    # every tenant; `rpm` / `tpm` its own limits (NULL: none) on top of each tenant's. Key ids are
    # unique across both key tables (the ledger names a key by its id).
    db.table("service_keys").create(
        {
            "key_id": str,
            "name": str,
            "key_hash": str,
            "tenants": str,
            "rpm": int,
            "tpm": int,
            "created_at": str,
            "revoked_at": str,
        },
        pk="key_id",
        not_null={"name", "key_hash", "created_at"},
    )
    db.table("service_keys").create_index(["key_hash"], unique=True)
    # Which kind of key acted: on each usage row ("tenant" or "service"; older rows: a tenant's),
    # and on each audit row about a key.
    db.table("usage").add_column("key_kind", str)
    db.table("audit_log").add_column("key_id", str)
    db.table("audit_log").add_column("key_kind", str)


@migration
def m020b_audit_chain(db: sqlite_utils.Database) -> None:
    # Each audit row chained to the one before it by a hash, from a random genesis made now; the
    # rows already there are chained in their order (tenancy/auditchain.py).
    auditchain.create(db)


@migration
def m020b_usage_monthly(db: sqlite_utils.Database) -> None:
    # What `lorabox usage` reports of ledger rows deleted by retention (tenancy/retention.py), per
    # tenant, month and box ('' for rows that named none), so a closed period's totals stay.
    db.table("usage_monthly").create(
        {
            "tenant": str,
            "month": str,
            "box_id": str,
            "requests": int,
            "prompt_tokens": int,
            "completion_tokens": int,
            "cost": float,
        },
        pk=("tenant", "month", "box_id"),
        not_null={"requests", "prompt_tokens", "completion_tokens", "cost"},
    )


@migration
def m021a_files(db: sqlite_utils.Database) -> None:
    # Files a tenant uploaded (`POST /v1/files`, batch/files.py): the bytes live on disk under
    # <state_dir>/files/<tenant>/<id>.jsonl, written before the row; a row names a whole file.
    db.table("files").create(
        {
            "id": str,
            "tenant": str,
            "filename": str,
            "purpose": str,
            "bytes": int,
            "lines": int,
            "created_at": int,
        },
        pk="id",
        not_null={"tenant", "filename", "purpose", "bytes", "lines", "created_at"},
    )
    db.table("files").create_index(["tenant", "created_at"])


@migration
def m021b_batches(db: sqlite_utils.Database) -> None:
    # Batch jobs (batch/jobs.py): one row each, with OpenAI's lifecycle timestamps and counts, and
    # the key that made it (its lines run as that key's requests).
    db.table("batches").create(
        {
            "id": str,
            "tenant": str,
            "key_id": str,
            "key_kind": str,
            "endpoint": str,
            "input_file_id": str,
            "completion_window": str,
            "metadata": str,
            "status": str,
            "errors": str,
            "output_file_id": str,
            "error_file_id": str,
            "total": int,
            "completed": int,
            "failed": int,
            "created_at": int,
            "in_progress_at": int,
            "expires_at": int,
            "finalizing_at": int,
            "completed_at": int,
            "failed_at": int,
            "expired_at": int,
            "cancelling_at": int,
            "cancelled_at": int,
        },
        pk="id",
        not_null={"tenant", "key_id", "endpoint", "input_file_id", "status", "created_at", "expires_at"},
        defaults={"total": 0, "completed": 0, "failed": 0},
    )
    db.table("batches").create_index(["tenant", "created_at"])
    db.table("batches").create_index(["status"])
    # Each input line, and once it has run its result (the output or error file's line, as JSON),
    # committed in groups: a line with a result is never run again, one without is run (again).
    db.table("batch_lines").create(
        {"batch_id": str, "line": int, "custom_id": str, "body": str, "result": str, "error": int},
        pk=("batch_id", "line"),
        not_null={"batch_id", "line", "body"},
    )
    db.execute("create index batch_lines_pending on batch_lines (batch_id, line) where result is null")


@migration
def m021c_usage_tier(db: sqlite_utils.Database) -> None:
    # Which band served a request: `default` (interactive) or `batch` (a line of a batch job, named
    # by `batch_id`, billed at the tenant's batch prices). Older rows: interactive (NULL).
    db.table("usage").add_column("tier", str)
    db.table("usage").add_column("batch_id", str)


@migration
def m021d_usage_monthly_tier(db: sqlite_utils.Database) -> None:
    # Retention's monthly totals kept per tier too, so `lorabox usage` shows batch and interactive
    # apart for summarised months as for single rows. Totals summarised before: interactive.
    db.table("usage_monthly").add_column("tier", str, not_null_default="default")
    db.table("usage_monthly").transform(pk=("tenant", "month", "box_id", "tier"))
