"""The usage spool: rows the database could not take, kept in append-only files until it can.

When SQLite refuses a batch of usage rows (another program holds its write lock, the disk is
full, an I/O error), the ledger appends them here, one JSON object per line, and a response waits
for that append instead of the commit. The ledger replays the spool into SQLite as soon as SQLite
takes writes again: each file in one transaction, then the file is removed.

Exactly once: every row carries a `uid`, unique in the usage table, and a row whose uid is
already booked is left out (Store.record_usage). A crash between a replay's commit and the
file's removal replays that file again at the next start and books nothing twice.

Durability, as the ledger's mode asks (UsageLedger): "fsync" syncs each append before it returns;
otherwise the ledger calls `sync` every second, as for SQLite's WAL. An append is in the kernel's
page cache when `append` returns: a crash or kill -9 of the daemon loses none of it; a power cut
loses what was not synced yet. A line cut short (a power cut mid-append, a disk that filled
mid-write) is skipped and logged when the file is replayed; it belonged to a response that never
got its last byte.

Files: `<dir>/usage-<nanoseconds>-<pid>.jsonl`, mode 0640, of at most SEGMENT_ROWS rows (so that
one replay transaction stays short). One is open for appending at a time; a replay first closes it
(the next append opens a new one), so a file being replayed never grows.
Everything here runs on the ledger's writer thread (or before the daemon serves).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .store import Store

log = logging.getLogger(__name__)

PREFIX, SUFFIX = "usage-", ".jsonl"
SEGMENT_ROWS = 10_000


def fsync_path(path: Path) -> None:
    """fsync a file or folder by name; one that is gone has nothing left to sync. Raises OSError."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class UsageSpool:
    def __init__(self, directory: Path, *, sync_each: bool):
        self.directory = directory
        self.sync_each = sync_each
        self._fd: int | None = None
        self._fd_rows = 0  # rows in the open file
        self._unsynced = False
        self.rows = sum(len(list(_rows_in(path))) for path in self.segments())
        """Rows appended and not yet replayed."""

    def segments(self) -> list[Path]:
        """The spool's files, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        except OSError as exc:  # not a folder, or not ours to read: nothing can be spooled there
            log.warning("cannot read the usage spool %s: %s", self.directory, exc)
            return []
        found = [self.directory / n for n in names if n.startswith(PREFIX) and n.endswith(SUFFIX)]
        return sorted(found, key=lambda path: _order(path.name))

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (durable as the mode asks once this returns); OSError if they could not be.

        A failed append leaves no partial line for the next one to run into: the file is cut back
        to where it was, or, if even that fails, closed, and the next append starts another."""
        data = b"".join(json.dumps(row, separators=(",", ":")).encode() + b"\n" for row in rows)
        fd = self._open()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.sync_each:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                self._close()
            raise
        self._unsynced = not self.sync_each
        self.rows += len(rows)
        self._fd_rows += len(rows)
        if self._fd_rows >= SEGMENT_ROWS:
            self.close()

    def sync(self) -> None:
        """fsync what was appended since the last sync (OSError if that fails)."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False

    def take_unsynced(self) -> int | None:
        """A descriptor of the open file if it was appended to since the last sync (a duplicate,
        the caller's to fsync and close: the slow fsync can then run on another thread while
        appends go on, and the open file may be closed meanwhile), else None."""
        if self._fd is None or not self._unsynced:
            return None
        self._unsynced = False
        return os.dup(self._fd)

    def replay(self, store: Store, database: Path) -> int:
        """Book every spooled row into the database; returns how many rows left the spool.

        File by file: one transaction each, the WAL synced, then the file removed. Raises
        (sqlite3.Error, OSError) at the first file the database does not take; that file and the
        later ones stay for the next replay. The open file is closed only once the database takes
        writes (a long lock does not leave a file a second behind it)."""
        replayed = 0
        for path in self.segments():
            with store.writing():
                if self._fd is not None:
                    self.close()  # complete now: the next append opens another file
                rows = list(_rows_in(path))
                store.record_usage(rows)
            # The spool's copy goes only once the database's is as safe as it was: in WAL mode a
            # commit may not be synced yet.
            fsync_path(Path(f"{database}-wal"))
            path.unlink()
            fsync_path(self.directory)
            self.rows -= len(rows)
            replayed += len(rows)
        self.rows = max(self.rows, 0)
        return replayed

    def tokens_since(self, since: str) -> dict[str, int]:
        """Prompt + completion tokens per tenant in rows from `since` on (as Store.tokens_since)."""
        tokens: dict[str, int] = {}
        for path in self.segments():
            for row in _rows_in(path):
                if str(row.get("ts", "")) >= since:
                    used = int(row.get("prompt_tokens") or 0) + int(row.get("completion_tokens") or 0)
                    tokens[row["tenant"]] = tokens.get(row["tenant"], 0) + used
        return tokens

    def close(self) -> None:
        """Sync and close the open file, if any (OSError if the sync fails)."""
        try:
            self.sync()
        finally:
            self._close()

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            path = self.directory / f"{PREFIX}{time.time_ns()}-{os.getpid()}{SUFFIX}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fd = os.open(path, flags, 0o640)
            fsync_path(self.directory)  # the new file's name survives a power cut with its rows
        return self._fd

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._fd_rows, self._unsynced = 0, False
            os.close(fd)


def _order(name: str) -> tuple[int, str]:
    stamp = name.removeprefix(PREFIX).split("-", 1)[0]
    return (int(stamp) if stamp.isdigit() else 0, name)


def _rows_in(path: Path) -> Iterator[dict[str, Any]]:
    """The file's rows; a line that is not a whole row (cut short) is skipped, and said so."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("uid"), str) and isinstance(row.get("tenant"), str):
            yield row
        elif line.strip():
            log.warning("usage spool %s line %d is not a whole row (cut short?): skipped", path, number)
