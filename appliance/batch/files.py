"""Files a tenant uploads for its batches (OpenAI's Files API): on disk, one row each in the store.

Layout: `<state_dir>/files/<tenant>/<id>.jsonl` (directories 0700, files 0600: they hold the
tenants' prompts). An upload streams to `<id>.partial` in that directory, chunk by chunk (never
the whole file in memory), counting bytes and lines against the tenant's caps as it goes; then it
is flushed to disk, renamed to its final name, and only then is its row written. So:
- a crash mid-upload leaves a `.partial` file and no row: `sweep()` removes it at the next start;
- a crash between the rename and the row leaves a file no row names: `sweep()` removes it too;
- a row always names a whole file. Deleting removes the row first, then the file (a crash in
  between leaves a file no row names, swept at the next start).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tenancy.store import Store

FILE_ID = re.compile(r"file-[0-9a-f]{24}")
FOLDER = "files"
"""The files' folder under the state directory: <state_dir>/files/<tenant>/<id>.jsonl."""
PURPOSES = ("batch",)
CHUNK_BYTES = 64 << 10
MAX_FILENAME_CHARS = 255


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    lines: int
    created_at: int

    def openai(self) -> dict[str, Any]:
        """The File object, as OpenAI's API answers it."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": None,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


class UploadRefused(Exception):
    """An upload past a cap: `status` 413 (bytes) or 400 (lines)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Caps:
    file_bytes: int
    room_bytes: int
    """What the tenant may still store (its cap less its files and uploads in progress)."""
    lines: int


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


# -- rows (reads on the loop's read-only connection; writes through the store writer) ----------


def _stored(row: dict[str, Any]) -> StoredFile:
    return StoredFile(**{k: row[k] for k in StoredFile.__dataclass_fields__})


def get_file(store: Store, tenant: str, file_id: str) -> StoredFile | None:
    """The tenant's file `file_id`; None for none, or another tenant's."""
    rows = list(store.db.query("select * from files where id = ? and tenant = ?", [file_id, tenant]))
    return _stored(rows[0]) if rows else None


def list_files(
    store: Store, tenant: str, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
) -> tuple[list[StoredFile], bool]:
    """A page of the tenant's files after the file `after` (cursor), and whether more follow."""
    where, args = ["tenant = ?"], [tenant]
    if purpose is not None:
        where.append("purpose = ?")
        args.append(purpose)
    if after is not None and (cursor := get_file(store, tenant, after)) is not None:
        sign = "<" if newest_first else ">"
        where.append(f"(created_at, id) {sign} (?, ?)")
        args += [cursor.created_at, cursor.id]  # type: ignore[list-item]
    order = "desc" if newest_first else "asc"
    # Only the fixed fragments above are formatted in; every value is a parameter.
    sql = f"select * from files where {' and '.join(where)} order by created_at {order}, id {order} limit ?"  # noqa: S608
    rows = [_stored(r) for r in store.db.query(sql, [*args, limit + 1])]
    return rows[:limit], len(rows) > limit


def stored_bytes(store: Store, tenant: str) -> int:
    row = store.db.execute("select coalesce(sum(bytes), 0) from files where tenant = ?", [tenant]).fetchone()
    return int(row[0])


def insert_file(store: Store, stored: StoredFile) -> None:
    with store.writing():
        store.db.table("files").insert({k: getattr(stored, k) for k in StoredFile.__dataclass_fields__})


def delete_file(store: Store, tenant: str, file_id: str) -> bool:
    with store.writing():
        cursor = store.db.execute("delete from files where id = ? and tenant = ?", [file_id, tenant])
    return cursor.rowcount > 0


def all_file_ids(store: Store) -> set[str]:
    return {row[0] for row in store.db.execute("select id from files")}


# -- bytes on disk ---------------------------------------------------------------------------------


class FileStore:
    """The tenants' uploaded files under `root`; counts the uploads in progress per tenant."""

    def __init__(self, root: Path):
        self.root = root
        self.uploading: dict[str, int] = {}
        """Bytes received so far by each tenant's uploads in progress (they count towards its cap)."""

    def path(self, tenant: str, file_id: str) -> Path:
        return self.root / tenant / f"{file_id}.jsonl"

    async def receive(self, tenant: str, file_id: str, chunks: Any, caps: Caps) -> tuple[int, int]:
        """Write the chunks (`await chunks.read_chunk(n)`, b"" at the end) to the file's final
        place, durably; returns (bytes, lines). UploadRefused past a cap (nothing is kept)."""
        final = self.path(tenant, file_id)
        partial = final.with_suffix(".partial")
        await asyncio.to_thread(_make_dir, final.parent)
        handle = await asyncio.to_thread(_open_new, partial)
        size = lines = 0
        last = b"\n"
        self.uploading[tenant] = self.uploading.get(tenant, 0)
        try:
            while chunk := await chunks.read_chunk(CHUNK_BYTES):
                size += len(chunk)
                self.uploading[tenant] += len(chunk)
                if size > caps.file_bytes:
                    raise UploadRefused(
                        413, f"The file is larger than this tenant's limit of {caps.file_bytes} bytes.",
                        "file_too_large",
                    )  # fmt: skip
                if size > caps.room_bytes:
                    raise UploadRefused(
                        413,
                        f"This tenant's files would take more than its limit; {caps.room_bytes} bytes "
                        "are left. Delete files it no longer needs.",
                        "files_quota_exceeded",
                    )
                lines += chunk.count(b"\n")
                last = chunk[-1:]
                if lines > caps.lines:
                    raise _too_many_lines(caps.lines)
                await asyncio.to_thread(handle.write, chunk)
            lines += last != b"\n"  # a last line without its newline
            if lines > caps.lines:
                raise _too_many_lines(caps.lines)
            await asyncio.to_thread(_publish, handle, partial, final)
        except BaseException:
            await asyncio.to_thread(_discard, handle, partial)
            raise
        finally:
            self.uploading[tenant] -= size
            if not self.uploading[tenant]:
                del self.uploading[tenant]
        return size, lines

    async def remove(self, tenant: str, file_id: str) -> None:
        await asyncio.to_thread(self.path(tenant, file_id).unlink, missing_ok=True)

    def sweep(self, known: set[str]) -> list[Path]:
        """Remove what no row names: uploads a crash cut, files whose row was never written or was
        deleted. Blocking: at start, before the API serves. Returns what it removed."""
        removed: list[Path] = []
        if not self.root.is_dir():
            return removed
        for path in self.root.glob("*/*"):
            if path.suffix == ".partial" or path.stem not in known:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def write_file(final: Path, lines: list[bytes]) -> None:
    """A file made by the box (a batch's output), written as an upload is: whole, or not at all.
    Blocking."""
    _make_dir(final.parent)
    partial = final.with_suffix(".partial")
    handle = _open_new(partial)
    try:
        handle.writelines(lines)
        _publish(handle, partial, final)
    except BaseException:
        _discard(handle, partial)
        raise


def _too_many_lines(cap: int) -> UploadRefused:
    return UploadRefused(400, f"The file has more than this tenant's limit of {cap} lines.", "too_many_lines")


def now() -> int:
    return int(time.time())


def _make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _open_new(path: Path) -> Any:
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")


def _publish(handle: Any, partial: Path, final: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    partial.rename(final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _discard(handle: Any, partial: Path) -> None:
    handle.close()
    partial.unlink(missing_ok=True)
