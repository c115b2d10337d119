"""Is the engine alive and answering? Watched from the daemon; engines know nothing of it.

An engine fails in two ways, and each has its own check:
- death: its process exited (killed, crashed, out of memory). `engine.failure()` says so within
  milliseconds; it is polled every `poll_s`.
- a hang: the process lives but its work loop no longer turns (a stuck kernel, a deadlock, a
  SIGSTOP). Only a round trip shows it: `engine.probe()` every `probe_every_s`, answered within
  `probe_timeout_s` or the engine counts as hung. Only the time this process's own event loop
  ran counts towards that timeout: a loop that could not run (a machine so overloaded that the
  daemon got no CPU for seconds) could not have read the engine's answer either, and one CI run
  saw a healthy engine declared hung after its daemon's loop had been held for 47 s. The wait
  goes in ticks of `PROBE_TICK_S`, and each counts at most its own length, however long it took.
On the first failure `on_failure(reason)` is called once and the watch ends: an engine is not
revived in place (the daemon exits, and systemd starts a fresh one). `last_ok` is when a probe
last answered (monotonic seconds): the proof of life an external watchdog can be fed from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import EngineDead
from .base import Engine

log = logging.getLogger(__name__)

PROBE_TICK_S = 0.25
"""How often a waiting probe looks at the clock; a tick that took longer counts as one."""


@dataclass(frozen=True)
class HealthSnapshot:
    failure: str | None
    """Why the engine can no longer serve; None while it can."""
    last_ok_s_ago: float | None
    """Seconds since a probe last answered (or the watch began: see `start`); None before."""
    probe_every_s: float
    probe_timeout_s: float


class EngineHealth:
    def __init__(
        self,
        engine: Engine,
        *,
        probe_every_s: float,
        probe_timeout_s: float,
        poll_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.engine = engine
        self.probe_every_s = probe_every_s
        self.probe_timeout_s = probe_timeout_s
        self.poll_s = poll_s
        self._clock = clock
        self.failure: str | None = None
        self.last_ok: float | None = None
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> HealthSnapshot:
        ago = None if self.last_ok is None else round(self._clock() - self.last_ok, 2)
        return HealthSnapshot(self.failure, ago, self.probe_every_s, self.probe_timeout_s)

    def start(self, on_failure: Callable[[str], None]) -> None:
        """Watch the (started) engine until it fails or `stop` is called.

        An engine that has just started has just answered: the watch counts from now, so that the
        systemd watchdog, armed at READY=1, is fed at once and not only once the first probe has
        come back (which took longer than the rest of start-up in half of the starts measured)."""
        self.last_ok = self._clock()
        self._task = asyncio.create_task(self._watch(on_failure), name="engine health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, on_failure: Callable[[str], None]) -> None:
        probe: asyncio.Task[str | None] | None = None
        next_probe = self._clock()
        reason = None
        try:
            # The probe runs beside the poll, so a death during a probe is seen at once.
            while (reason := self.engine.failure()) is None:
                if probe is None and self._clock() >= next_probe:
                    probe = asyncio.create_task(self._probe(), name="engine probe")
                if probe is not None and probe.done():
                    reason, probe = probe.result(), None
                    if reason is not None:
                        break
                    next_probe = self._clock() + self.probe_every_s
                await asyncio.sleep(self.poll_s)
        finally:
            if probe is not None:
                probe.cancel()
        self.failure = reason
        log.error("engine failed: %s", reason)
        on_failure(reason)

    async def _probe(self) -> str | None:
        """None when the engine answered in time, else why it counts as failed."""
        answer = asyncio.ensure_future(self.engine.probe())
        waited = 0.0  # of the loop's own running time
        try:
            while not answer.done():
                if waited >= self.probe_timeout_s:
                    return (
                        f"the engine did not answer a health probe within {self.probe_timeout_s:g} s (hung)"
                    )
                tick, began = min(PROBE_TICK_S, self.probe_timeout_s - waited), self._clock()
                await asyncio.wait({answer}, timeout=tick)
                waited += min(self._clock() - began, tick)
            answer.result()
        except EngineDead as exc:
            return str(exc)
        except Exception as exc:  # the protocol allows none: the engine is in a state nobody knows
            log.exception("engine health probe raised")
            return f"the engine's health probe raised {exc!r}"
        finally:
            answer.cancel()  # unanswered (or this probe was cancelled): stop waiting for it
        self.last_ok = self._clock()
        return None
