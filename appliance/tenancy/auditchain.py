"""The audit log as a hash chain: an edited, inserted or deleted row shows.

Each row carries `prev_hash` (the hash of the row before it; the first row's is the genesis, a
random value made when the database was) and `hash`, the SHA-256 of the row's canonical JSON:
every column but `hash` itself, `prev_hash` included, so a column added later (which key acted)
is covered without changing this module. Columns that are NULL are left out of the JSON, so a
nullable column added by a migration leaves the hashes of the older rows as they were.
`audit_chain` holds the genesis and the head (the last row's id and hash), which shows a deleted
last row too.

What it proves: that the rows were not changed by anyone who did not also recompute every later
hash and the head. The chain lives in the same file, so someone with write access and this code
can rebuild it; a client who kept the head of an earlier export (`lorabox audit --export`) can tell
that every row it covered is still there unchanged.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlite_utils


def row_hash(row: dict[str, Any]) -> str:
    content = {k: v for k, v in row.items() if k != "hash" and v is not None}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def create(db: sqlite_utils.Database) -> None:
    """The chain's table, its genesis, and the hashes of the rows already there (a migration)."""
    db.table("audit_log").add_column("prev_hash", str)
    db.table("audit_log").add_column("hash", str)
    db.table("audit_chain").create({"id": int, "genesis": str, "head_id": int, "head_hash": str}, pk="id")
    genesis = secrets.token_hex(32)
    db.table("audit_chain").insert({"id": 1, "genesis": genesis, "head_id": 0, "head_hash": genesis})
    for (row_id,) in db.execute("select id from audit_log order by id").fetchall():
        seal(db, row_id)


def seal(db: sqlite_utils.Database, row_id: int) -> None:
    """Chain a row just inserted onto the head; the caller holds the write lock (one transaction)."""
    head = db.execute("select head_hash from audit_chain where id = 1").fetchone()[0]
    db.execute("update audit_log set prev_hash = ?, hash = null where id = ?", [head, row_id])
    row = _rows(db, "where id = ?", [row_id])[0]
    digest = row_hash(row)
    db.execute("update audit_log set hash = ? where id = ?", [digest, row_id])
    db.execute("update audit_chain set head_id = ?, head_hash = ? where id = 1", [row_id, digest])


def _rows(db: sqlite_utils.Database, where: str = "", args: list[Any] | None = None) -> list[dict[str, Any]]:
    return list(db.query(f"select * from audit_log {where}", args or []))  # noqa: S608 (ours)


def rows(db: sqlite_utils.Database) -> Iterator[dict[str, Any]]:
    """Every row with its hashes, oldest first (what `lorabox audit --export` writes)."""
    return db.query("select * from audit_log order by id")


@dataclass(frozen=True)
class Verdict:
    rows: int
    head: str
    problem: str = ""
    """Empty when the chain holds; else which row is the first that does not, and how."""
    row_id: int | None = None


def verify(db: sqlite_utils.Database) -> Verdict:
    """Walk the chain from the genesis; the first row that breaks it, named."""
    genesis, head_id, head_hash = db.execute(
        "select genesis, head_id, head_hash from audit_chain where id = 1"
    ).fetchone()
    previous, previous_id, count = genesis, 0, 0
    for row in rows(db):
        count += 1
        row_id = row["id"]
        if row.get("hash") != row_hash(row):
            return Verdict(count, previous, f"audit row {row_id} was edited or inserted: its hash "
                           "does not match its content", row_id)  # fmt: skip
        if row["prev_hash"] != previous:
            what = (
                f"the row(s) between {previous_id} and {row_id} were deleted"
                if row_id > previous_id + 1
                else "it was inserted, or the row before it was deleted"
            )
            return Verdict(
                count, previous, f"audit row {row_id} does not follow row {previous_id}: {what}", row_id
            )
        previous, previous_id = row["hash"], row_id
    if (head_id, head_hash) != (previous_id, previous):
        if head_id > previous_id:
            problem = f"the last row(s) after {previous_id}, up to {head_id}, were deleted"
        else:
            problem = f"the chain's head names row {head_id}, not the last row {previous_id}: edited"
        return Verdict(count, previous, problem, head_id)
    return Verdict(count, previous)
