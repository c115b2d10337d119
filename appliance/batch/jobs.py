"""Batch jobs in the state database: OpenAI's Batch object, its lifecycle, its lines.

Lifecycle (OpenAI's): validating → in_progress → finalizing → completed; or failed (the input
file is not a batch: no lines, a duplicate custom_id; or the tenant's quota ran out), expired
(the completion window passed; the finished lines are kept), cancelling → cancelled (the finished
lines are kept).

Durability: the input's lines are copied into `batch_lines` when the batch is validated (so the
input file may be deleted), each line's result is written into its row, in groups of lines, one
transaction a group (`commit_results`). A line with a result is never run again; one without is
run after a restart, so what a crash loses is the uncommitted group's work (run again), never a
result that was committed, and never a line. The output and error files are made from the rows
when the batch ends, and the rows deleted in the same transaction.

Functions taking a `Store` first run on the store writer's thread (writes, and the long reads);
`get_batch`/`list_batches`/`pending_lines` are short reads for the event loop's connection.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..tenancy.store import Store
from .files import FileStore, StoredFile, new_file_id, write_file

BATCH_ID_PREFIX = "batch_"
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
COMPLETION_WINDOWS = {"24h": 24 * 3600}
OUTPUT_PURPOSE = "batch_output"
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
ENDED = ("completed", "failed", "expired", "cancelled")
INSERT_GROUP = 1000
"""Lines read (in a thread) and inserted per transaction while a batch is validated: the writer's
lock is held for one group at a time (milliseconds), so the usage ledger's commits go on in
between. With 5,000 a group, the 100,000-line validation held the event loop over 100 ms in 3 of 6
runs on the shared llama.cpp test daemon (102-111 ms); with 1,000, in none of 5."""


@dataclass(frozen=True)
class Batch:
    id: str
    tenant: str
    key_id: str
    key_kind: str
    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: str | None
    status: str
    errors: str | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None

    def openai(self) -> dict[str, Any]:
        """The Batch object, as OpenAI's API answers it."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": json.loads(self.errors) if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": json.loads(self.metadata) if self.metadata else None,
        }


_COLUMNS = tuple(f.name for f in fields(Batch))


def _batch(row: dict[str, Any]) -> Batch:
    return Batch(**{k: row[k] for k in _COLUMNS})


def new_batch_id() -> str:
    return f"{BATCH_ID_PREFIX}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


# -- reads (the loop's connection) ---------------------------------------------------------------


def get_batch(store: Store, batch_id: str, tenant: str | None = None) -> Batch | None:
    """The batch; with `tenant`, None when it is another tenant's."""
    rows = list(store.db.query("select * from batches where id = ?", [batch_id]))
    if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
        return None
    return _batch(rows[0])


def list_batches(
    store: Store, tenant: str | None, *, after: str | None = None, limit: int = 20
) -> tuple[list[Batch], bool]:
    """Newest first, a page after the batch `after` (cursor); and whether more follow."""
    where, args = ["1 = 1"], []
    if tenant is not None:
        where.append("tenant = ?")
        args.append(tenant)
    if after is not None and (cursor := get_batch(store, after, tenant)) is not None:
        where.append("(created_at, id) < (?, ?)")
        args += [cursor.created_at, cursor.id]  # type: ignore[list-item]
    # Only the fixed fragments above are formatted in; every value is a parameter.
    sql = f"select * from batches where {' and '.join(where)} order by created_at desc, id desc limit ?"  # noqa: S608
    rows = [_batch(r) for r in store.db.query(sql, [*args, limit + 1])]
    return rows[:limit], len(rows) > limit


def active_batches(store: Store) -> list[Batch]:
    marks = ",".join("?" * len(ACTIVE))
    sql = f"select * from batches where status in ({marks}) order by created_at, id"  # noqa: S608
    return [_batch(r) for r in store.db.query(sql, list(ACTIVE))]


def pending_lines(store: Store, batch_id: str, after: int, limit: int) -> list[tuple[int, str | None, str]]:
    """Lines of the batch still without a result, after line `after`: (line, custom_id, body)."""
    sql = (
        "select line, custom_id, body from batch_lines where batch_id = ? and result is null and line > ? "
        "order by line limit ?"
    )
    return [(row[0], row[1], row[2]) for row in store.db.execute(sql, [batch_id, after, limit])]


# -- writes (the store writer's thread) -----------------------------------------------------------


def insert_batch(store: Store, batch: Batch) -> None:
    with store.writing():
        store.db.table("batches").insert({k: getattr(batch, k) for k in _COLUMNS})


def set_status(store: Store, batch_id: str, status: str, **values: Any) -> None:
    """Move the batch to `status`, stamping `<status>_at` (OpenAI's names) unless given."""
    stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "completed": "completed_at",
             "failed": "failed_at", "expired": "expired_at", "cancelling": "cancelling_at",
             "cancelled": "cancelled_at"}.get(status)  # fmt: skip
    if stamp is not None:
        values.setdefault(stamp, now())
    with store.writing():
        store.db.table("batches").update(batch_id, {"status": status, **values})


def fail_validation(store: Store, batch_id: str, errors: list[dict[str, Any]]) -> None:
    """The input is not a batch: failed, with OpenAI's `errors`, and the lines copied so far gone."""
    with store.writing():
        store.db.execute("delete from batch_lines where batch_id = ?", [batch_id])
        values = {
            "status": "failed",
            "failed_at": now(),
            "errors": json.dumps({"object": "list", "data": errors}),
        }
        store.db.table("batches").update(batch_id, values)


def cancel(store: Store, batch_id: str, tenant: str) -> Batch | None:
    """Mark an active batch `cancelling` (the runner ends it); an ended one is left as it is."""
    with store.writing():
        row = store.db.execute(
            "select status from batches where id = ? and tenant = ?", [batch_id, tenant]
        ).fetchone()
        if row is None:
            return None
        if row[0] in ("validating", "in_progress"):
            store.db.table("batches").update(batch_id, {"status": "cancelling", "cancelling_at": now()})
    return get_batch(store, batch_id, tenant)


@dataclass(frozen=True)
class Line:
    """One input line as validation found it: a request to run, or already its error."""

    line: int
    custom_id: str | None
    body: str
    """The request body (JSON), to run; or the error line (JSON) when `error`."""
    error: bool = False


class ValidationFailed(Exception):
    """The input file is not a batch; `errors` are OpenAI's error objects (code, message, line)."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["message"])
        self.errors = errors


def read_groups(path: Path, endpoint: str, size: int = INSERT_GROUP) -> Iterator[list[Line]]:
    """The input file's lines in groups of `size`, each a request or an error line; raises
    ValidationFailed (as it reaches the line) if the file is not a batch: a duplicate custom_id,
    or no request at all. Blocking: each group is read in a thread. Groups, not the whole file: a
    file of 100,000 lines held at once is enough live objects for the garbage collector's full
    passes to hold every thread, the event loop included, for half a second."""
    seen: dict[str, int] = {}
    group: list[Line] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            parsed = _line(number, raw, endpoint)
            if parsed.custom_id is not None:
                if parsed.custom_id in seen:
                    raise ValidationFailed(
                        [{"code": "duplicate_custom_id", "line": number, "param": "custom_id",
                          "message": f"The custom_id {parsed.custom_id!r} of line {number} is also line "
                                     f"{seen[parsed.custom_id]}'s; each request needs its own."}]
                    )  # fmt: skip
                seen[parsed.custom_id] = number
            group.append(parsed)
            if len(group) == size:
                yield group
                group = []
    if group:
        yield group


def _line(number: int, raw: bytes, endpoint: str) -> Line:
    """One line: the request's body to run, or its error line (a line that is not a request)."""
    try:
        request = json.loads(raw)
    except ValueError as exc:
        return _error_line(number, None, "invalid_json", f"Line {number} is not valid JSON ({exc}).")
    if not isinstance(request, dict):
        return _error_line(number, None, "invalid_request", f"Line {number} is not a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _error_line(number, None, "missing_custom_id", f"Line {number} has no custom_id.")
    if request.get("method", "POST") != "POST":
        return _error_line(number, custom_id, "invalid_method", f"Line {number}: the method must be POST.")
    if request.get("url") != endpoint:
        message = (
            f"Line {number}: the url must be the batch's endpoint, {endpoint}, not {request.get('url')!r}."
        )
        return _error_line(number, custom_id, "invalid_url", message)
    if not isinstance(request.get("body"), dict):
        return _error_line(number, custom_id, "invalid_body", f"Line {number}: 'body' must be a JSON object.")
    return Line(number, custom_id, json.dumps(request["body"], ensure_ascii=False))


def _error_line(number: int, custom_id: str | None, code: str, message: str) -> Line:
    error = {"code": code, "message": message}
    return Line(number, custom_id, json.dumps(result_line(custom_id, None, error)), error=True)


def result_line(
    custom_id: str | None, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    """An output or error file's line, as OpenAI's: `response` {status_code, request_id, body}."""
    return {
        "id": f"batch_req_{secrets.token_hex(12)}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def add_lines(store: Store, batch_id: str, lines: list[Line], *, first: bool) -> None:
    """One group of the batch's lines (`first`: the first group, after an earlier try's lines are
    cleared: a validation cut by a crash is done again)."""
    with store.writing():
        if first:
            store.db.execute("delete from batch_lines where batch_id = ?", [batch_id])
        store.db.conn.executemany(
            "insert into batch_lines (batch_id, line, custom_id, body, result, error) "
            "values (?, ?, ?, ?, ?, ?)",
            [
                (batch_id, ln.line, ln.custom_id, "{}" if ln.error else ln.body,
                 ln.body if ln.error else None, int(ln.error))
                for ln in lines
            ],
        )  # fmt: skip


def start(store: Store, batch_id: str) -> None:
    """Validated: in progress, with its counts from the lines (error lines count as failed)."""
    with store.writing():
        total, failed = store.db.execute(
            "select count(*), coalesce(sum(error), 0) from batch_lines where batch_id = ?", [batch_id]
        ).fetchone()
        store.db.table("batches").update(
            batch_id, {"status": "in_progress", "in_progress_at": now(), "total": total, "failed": failed}
        )


def commit_results(
    store: Store, batch_id: str, results: Sequence[tuple[int, str, bool, dict[str, Any] | None]]
) -> None:
    """One group of lines' results (line, result line as JSON, is an error, its usage row or None),
    with the batch's counts and the lines' usage rows, in one transaction: all of them are durable,
    or none. A line that has a result already (it ran again: a group in flight when the runner
    stopped was committed after all) is left as it was, uncounted and unbooked, so a line is in
    the ledger exactly when its result is: never twice, never lost."""
    with store.writing():
        usage, completed, failed = [], 0, 0
        for line, result, error, row in results:
            taken = store.db.execute(
                "update batch_lines set result = ?, error = ? "
                "where batch_id = ? and line = ? and result is null",
                [result, int(error), batch_id, line],
            ).rowcount
            if taken:
                failed, completed = failed + error, completed + (not error)
                usage += [row] if row is not None else []
        store.record_usage(usage)
        store.db.execute(
            "update batches set completed = completed + ?, failed = failed + ? where id = ?",
            [completed, failed, batch_id],
        )


def fail_pending(store: Store, batch_id: str, code: str, message: str) -> None:
    """Every line still without a result ends with this error (the batch stops there)."""
    rows = store.db.execute(
        "select line, custom_id from batch_lines where batch_id = ? and result is null", [batch_id]
    ).fetchall()
    results = [
        (line, json.dumps(result_line(cid, None, {"code": code, "message": message})), True, None)
        for line, cid in rows
    ]
    commit_results(store, batch_id, results)


def finish(store: Store, files: FileStore, batch_id: str, status: str, **values: Any) -> None:
    """End the batch as `status`: its output and error files made from the lines' results (the
    lines without one are left out), the lines deleted, the batch ended, in one transaction after
    the files are on disk (a crash before it: the batch is finished again at the next start)."""
    batch = get_batch(store, batch_id)
    assert batch is not None
    outputs: dict[bool, list[bytes]] = {False: [], True: []}
    for result, error in store.db.execute(
        "select result, error from batch_lines where batch_id = ? and result is not null order by line",
        [batch_id],
    ):
        outputs[bool(error)].append(result.encode() + b"\n")
    made: dict[str, StoredFile] = {}
    for error, lines in outputs.items():
        if lines:
            name = f"{batch_id}_{'error' if error else 'output'}.jsonl"
            size = sum(map(len, lines))
            stored = StoredFile(new_file_id(), batch.tenant, name, OUTPUT_PURPOSE, size, len(lines), now())
            write_file(files.path(batch.tenant, stored.id), lines)
            made["error_file_id" if error else "output_file_id"] = stored
    stamp = {"completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
             "cancelled": "cancelled_at"}[status]  # fmt: skip
    values.setdefault(stamp, now())
    with store.writing():
        for column, stored in made.items():
            store.db.table("files").insert({k: getattr(stored, k) for k in StoredFile.__dataclass_fields__})
            values[column] = stored.id
        store.db.table("batches").update(batch_id, {"status": status, **values})
        store.db.execute("delete from batch_lines where batch_id = ?", [batch_id])
