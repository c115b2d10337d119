"""The batch runner: validates new batches, feeds their lines to the request core, commits the
results in groups, ends batches (completed, failed, expired, cancelled) with their files.

Rule: at most `max_running` lines run at once, over all batches, taken round-robin one batch at a
time (oldest first), and none while the box is not serving (engine loading, ledger unavailable,
shutting down). A line runs as the request it holds, through the same admission
and core as an interactive request (`RunLine`, api/batches.py); a line the box could not run now
(503, a retryable 429) goes back to wait, and is not a result.

Bound (durability): results are committed `group` lines at a time, or after `flush_s`, each with
its usage row in the same transaction; a crash loses at most the uncommitted results (those lines
run again after the restart, and were not booked), never a committed one. So each line is in the
output and in the usage ledger exactly once. (A line that ran without a result, cut or refused
for now, is booked through the ledger as any request is: 499 or 503.)

Knob: `max_running` (the scheduler's band size, `batch_max_running`); the band itself decides when
each line handed to it starts (tenancy/scheduler.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraboxError
from ..tenancy.store import Store
from ..tenancy.writer import StoreWriter
from . import jobs
from .files import FileStore

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of one line: its result, or that it must run again later."""

    response: dict[str, Any] | None
    """The result's `response` ({status_code, request_id, body}); None: no result, run it again."""
    error: bool = False
    retry_after_s: float = 1.0
    stop: str | None = None
    """The batch stops at this line (the tenant's quota ran out): why, for the lines left."""
    usage: dict[str, Any] | None = None
    """The line's usage row (if it was admitted): committed with its result, in one transaction."""
    count: Callable[[], None] = lambda: None
    """Tells telemetry of the line: once its result is durable."""
    book: Callable[[], None] = lambda: None
    """With no result: books the line's usage through the ledger (what it ran, if it ran)."""


RunLine = Callable[[jobs.Batch, str], Awaitable[Outcome]]


@dataclass(frozen=True)
class _Done:
    """A line's result, until it is committed."""

    line: int
    result: str
    error: bool
    usage: dict[str, Any] | None
    count: Callable[[], None]


@dataclass
class _Progress:
    """What the runner holds of one batch in progress."""

    cursor: int = 0
    """The last line taken; a line put back moves it back."""
    running: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    done: list[_Done] = field(default_factory=list)
    first_done_at: float = 0.0
    retry_at: float = 0.0
    stop: str | None = None


class BatchRunner:
    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        files: FileStore,
        run_line: RunLine,
        ready: Callable[[], bool],
        max_running: Callable[[], int],
        *,
        group: int = 64,
        flush_s: float = 1.0,
        poll_s: float = 0.5,
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.writer, self.files, self.run_line = store, writer, files, run_line
        self.ready, self.max_running = ready, max_running
        self.group, self.flush_s, self.poll_s, self.clock = group, flush_s, poll_s, clock
        self._progress: dict[str, _Progress] = {}
        self._validating: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look again now (a batch was made or cancelled, a line ended)."""
        self._wake.set()

    @property
    def running(self) -> int:
        return sum(len(p.running) for p in self._progress.values())

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Runs in the background until the app stops; then ends what runs and commits what ended."""
        task = asyncio.create_task(self._loop(), name="lorabox-batches")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._stop_all()

    async def running_ctx(self, _app: object) -> AsyncIterator[None]:
        """For aiohttp's cleanup_ctx."""
        async with self.serving():
            yield

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except LoraboxError as exc:  # the database did not take a write: next time
                log.warning("batch runner: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()

    async def step(self) -> None:
        """One pass over the active batches: validate, start lines, commit, end."""
        active = jobs.active_batches(self.store)
        for gone in set(self._progress) - {batch.id for batch in active}:  # its tenant was removed
            for task in self._progress.pop(gone).running.values():
                task.cancel()
        for batch in active:
            if batch.status == "validating":
                if batch.id not in self._validating:
                    self._validating[batch.id] = asyncio.create_task(self._validate(batch))
            elif batch.status == "cancelling":
                await self._end(batch, "cancelled")
            elif batch.status == "finalizing":  # a crash cut its end short
                await self._end(batch, "completed")
            elif self.clock() >= batch.expires_at:
                await self._end(batch, "expired", "batch_expired", "The batch's completion window passed.")
            else:
                progress = self._progress.setdefault(batch.id, _Progress())
                if progress.stop is not None and not progress.running:
                    await self._end(batch, "failed", "insufficient_quota", progress.stop)
                elif progress.done and (
                    len(progress.done) >= self.group
                    or self.clock() - progress.first_done_at >= self.flush_s
                    or not (progress.running or self._pending(batch.id, progress.cursor, 1))  # its last
                ):
                    await self._commit(batch.id, progress)
                elif not progress.running and not progress.done and not self._pending(batch.id, -1, 1):
                    await self.writer.call(jobs.set_status, batch.id, "finalizing")
                    await self._end(batch, "completed")
        if self.ready():
            self._start_lines()

    def _pending(self, batch_id: str, after: int, limit: int) -> list[tuple[int, str | None, str]]:
        return jobs.pending_lines(self.store, batch_id, after, limit)

    def _start_lines(self) -> None:
        """Fill the free places, one line from each batch in turn (oldest batch first)."""
        free = self.max_running() - self.running
        now = self.clock()
        queues = {}
        for batch in jobs.active_batches(self.store):
            progress = self._progress.get(batch.id)
            if batch.status != "in_progress" or progress is None or progress.stop or progress.retry_at > now:
                continue
            taken = {done.line for done in progress.done} | set(progress.running)
            lines = [
                ln for ln in self._pending(batch.id, progress.cursor, free + len(taken)) if ln[0] not in taken
            ]
            if lines:
                queues[batch.id] = (batch, progress, lines)
        while free > 0 and queues:
            for batch_id in list(queues):
                batch, progress, lines = queues[batch_id]
                line, custom_id, body = lines.pop(0)
                progress.cursor = line
                task = asyncio.create_task(self._run(batch, progress, line, custom_id, body))
                progress.running[line] = task
                free -= 1
                if not lines:
                    del queues[batch_id]
                if free == 0:
                    break

    async def _run(
        self, batch: jobs.Batch, progress: _Progress, line: int, custom_id: str | None, body: str
    ) -> None:
        try:
            outcome = await self.run_line(batch, body)
        except asyncio.CancelledError:
            return  # cancelled or expired: the line has no result
        except Exception:
            log.exception("batch %s line %d failed", batch.id, line)
            error = {"code": "internal_error", "message": "The line failed in lorabox; see its log."}
            outcome = Outcome({"status_code": 500, "request_id": "", "body": {"error": error}}, error=True)
        finally:
            progress.running.pop(line, None)
            self.wake()
        if outcome.stop is not None:
            progress.stop = outcome.stop
        if outcome.response is None:
            outcome.book()
            progress.cursor = min(progress.cursor, line - 1)
            progress.retry_at = max(progress.retry_at, self.clock() + outcome.retry_after_s)
            return
        result = jobs.result_line(custom_id, outcome.response, None)
        if not progress.done:
            progress.first_done_at = self.clock()
        text = json.dumps(result, ensure_ascii=False)
        progress.done.append(_Done(line, text, outcome.error, outcome.usage, outcome.count))

    async def _commit(self, batch_id: str, progress: _Progress) -> None:
        done, progress.done = progress.done, []
        results = [(d.line, d.result, d.error, d.usage) for d in done]
        try:
            await self.writer.call(jobs.commit_results, batch_id, results)
        except BaseException:
            progress.done = done + progress.done  # not durable: kept for the next try
            raise
        for d in done:
            d.count()

    async def _end(self, batch: jobs.Batch, status: str, code: str = "", message: str = "") -> None:
        """End the batch: its running lines cancelled, what finished committed, the lines left
        failed with `code` (if given), its files made."""
        progress = self._progress.pop(batch.id, None)
        if progress is not None:
            for task in list(progress.running.values()):
                task.cancel()
            await asyncio.gather(*progress.running.values(), return_exceptions=True)
            if progress.done:
                try:
                    await self._commit(batch.id, progress)
                except BaseException:
                    self._progress[batch.id] = progress
                    raise
        if code:
            await self.writer.call(jobs.fail_pending, batch.id, code, message)
        await self.writer.call(jobs.finish, self.files, batch.id, status)
        log.info("batch %s of %s %s", batch.id, batch.tenant, status)

    async def _validate(self, batch: jobs.Batch) -> None:
        try:
            await self._read_input(batch)
        finally:
            self._validating.pop(batch.id, None)

    async def _read_input(self, batch: jobs.Batch) -> None:
        """Copy the input's lines into the batch's rows, a group at a time (read in a thread,
        written by the store writer), then start it; or fail it, saying why."""
        path = self.files.path(batch.tenant, batch.input_file_id)
        try:
            groups = jobs.read_groups(path, batch.endpoint)
            first = True
            while (group := await asyncio.to_thread(next, groups, None)) is not None:
                await self.writer.call(jobs.add_lines, batch.id, group, first=first)
                first = False
            if first:
                raise jobs.ValidationFailed(
                    [{"code": "empty_file", "line": None, "param": "input_file_id",
                      "message": "The input file has no requests."}]
                )  # fmt: skip
        except jobs.ValidationFailed as exc:
            await self.writer.call(jobs.fail_validation, batch.id, exc.errors)
            return
        except OSError as exc:
            error = {"code": "invalid_input_file", "line": None, "param": "input_file_id",
                     "message": f"The input file could not be read: {exc.strerror}."}  # fmt: skip
            await self.writer.call(jobs.fail_validation, batch.id, [error])
            return
        await self.writer.call(jobs.start, batch.id)
        self.wake()

    async def _stop_all(self) -> None:
        """At shutdown (after the drain): what still runs is cut, what ended is committed."""
        for task in self._validating.values():
            task.cancel()
        for progress in self._progress.values():
            for task in progress.running.values():
                task.cancel()
            await asyncio.gather(*progress.running.values(), return_exceptions=True)
        for batch_id, progress in self._progress.items():
            if progress.done:
                try:
                    await self._commit(batch_id, progress)
                except LoraboxError as exc:
                    log.warning(
                        "batch %s: %d results not committed (%s): they run again",
                        batch_id,
                        len(progress.done),
                        exc,
                    )
