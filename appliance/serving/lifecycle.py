"""Generation requests in flight, and how the server ends them: drain, cut, or fail fast.

Phases: serving → stopping (SIGTERM: new requests are refused while those in flight may finish
until the drain deadline; then the rest are cut) or → failed (the engine died or hung: new
requests are refused and everything in flight is cut at once). Either way the daemon then exits.

Each generation request is tracked from admission (`request()`) until it has booked its usage
row; the part that waits on the engine is `interruptible()`. The server cuts a request only
through `interrupt()`: its task is cancelled, and at the edge of the interruptible block the
cancellation becomes `Interrupted` (as asyncio.timeout turns its own into TimeoutError), so the
request can still tell its client why (an in-band error event for a stream) and book itself as a
server error. A client that hangs up remains a plain cancellation (booked 499).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

CUT_GRACE_S = 2.0
"""How long cut requests get to send their error event and book their usage row."""

SHUTTING_DOWN = "server_shutting_down"
ENGINE_FAILED = "engine_failed"


class Interrupted(Exception):
    """The server ended (or refused) this request, not its client; `code` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    @classmethod
    def engine_failed(cls, reason: str) -> Interrupted:
        return cls(
            ENGINE_FAILED, f"The inference engine failed ({reason}); lorabox is restarting. Retry shortly."
        )

    @classmethod
    def shutting_down(cls) -> Interrupted:
        return cls(SHUTTING_DOWN, "lorabox is shutting down; retry shortly.")

    def again(self) -> Interrupted:
        """A fresh instance for one more request (each raise gets its own traceback)."""
        return Interrupted(self.code, self.message)


@dataclass(eq=False)
class InFlight:
    """One generation request, from admission until its usage row is booked."""

    task: asyncio.Task[object]
    interruption: Interrupted | None = None
    _cancelling: int = 0
    _interruptible: bool = False

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """The server may cut this block short; it then raises `Interrupted`."""
        if self.interruption is not None:
            raise self.interruption
        self._cancelling = self.task.cancelling()
        self._interruptible = True
        try:
            yield
        except asyncio.CancelledError as exc:
            # Ours alone (a client hang-up at the same moment leaves a cancellation standing).
            if self.interruption is not None and self.task.uncancel() <= self._cancelling:
                raise self.interruption from exc
            raise
        finally:
            self._interruptible = False

    def interrupt(self, interruption: Interrupted) -> None:
        if self.interruption is not None:
            return  # already cut, or on its way out
        self.interruption = interruption.again()
        if self._interruptible:
            self.task.cancel()


class Lifecycle:
    def __init__(self) -> None:
        self.failure: str | None = None
        self._refusal: Interrupted | None = None
        self._in_flight: set[InFlight] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()

    @property
    def phase(self) -> str:
        return "failed" if self.failure else "stopping" if self._stop.is_set() else "serving"

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @contextmanager
    def request(self) -> Iterator[InFlight]:
        """Track one request; raises `Interrupted` at once when the server takes no new work."""
        if self._refusal is not None:
            raise self._refusal.again()
        task = asyncio.current_task()
        assert task is not None, "requests run in tasks"
        entry = InFlight(task)
        self._in_flight.add(entry)
        self._idle.clear()
        try:
            yield entry
        finally:
            self._in_flight.discard(entry)
            if not self._in_flight:
                self._idle.set()

    def interrupt(self, interruption: Interrupted) -> None:
        for entry in self._in_flight:
            entry.interrupt(interruption)

    def stop(self) -> None:
        """Stop taking work (SIGTERM, SIGINT); `wind_down` drains what runs. Asked again (a second
        Ctrl-C), it cuts what still runs at once."""
        if self._stop.is_set():
            self.interrupt(Interrupted.shutting_down())
            return
        self._refusal = Interrupted.shutting_down()
        self._stop.set()

    def fail(self, reason: str) -> None:
        """The engine can no longer serve: refuse new work, cut everything in flight, stop.

        Not once stopping: then the engine's end is expected (a Ctrl-C reaches its process too),
        and a request it breaks during the drain ends with that error by itself."""
        if self._stop.is_set():
            return
        self.failure = reason
        self._refusal = Interrupted.engine_failed(reason)
        self.interrupt(self._refusal)
        self._stop.set()

    async def stopped(self) -> None:
        """Returns once `stop` or `fail` was called."""
        await self._stop.wait()

    async def wind_down(self, drain_s: float) -> None:
        """Let requests in flight finish for up to `drain_s` (not at all after a failure), cut
        the rest, and give those CUT_GRACE_S to tell their clients and book themselves."""
        if self.failure is None and not await self._quiet(drain_s):
            log.warning(
                "%d requests still running after the %g s drain: ending them", self.in_flight, drain_s
            )
            self.interrupt(Interrupted.shutting_down())
        if not await self._quiet(CUT_GRACE_S):
            log.error("%d cut requests did not end within %g s", self.in_flight, CUT_GRACE_S)

    async def _quiet(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
