"""Which waiting request goes to the engine next: weighted fair across tenants (or FIFO).

Fair mode follows VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24). Each
tenant has a virtual token counter: the tokens it has been served, prompt + 2 x completion,
divided by its weight, charged as they are served (the prompt when the request starts, each
completion token as it comes). At most `max_running` requests run in the engine; when one ends,
the waiting request of the tenant with the lowest counter starts (a tenant's own requests in
arrival order). Work-conserving: a tenant alone gets every place. A tenant that had nothing
waiting or running starts at the lowest counter of those active (or, with none active, at the
counter of the last one to go idle): it banks no credit for the time it was away.

One addition for latency isolation: a request that finds its tenant idle (nothing queued or
running) starts at once even when all `max_running` places are taken, so a tenant sending one
request at a time never waits behind a flood; the flood's requests then start again only once the
total is back under `max_running`. At most one such request per tenant comes on top, and a
backlogged tenant gets none (its share stays what its weight says).

The bound (for two tenants f and g waiting throughout an interval, fair mode): the service each
received, in the counters' units (prompt + 2 x completion, over the weight), differs by at most
`max_running` x U, where U is one request's largest cost over the smaller weight. A tenant's
request starts only when its counter is the lowest; after that its counter grows by at most what
its requests running then still cost, and it has at most `max_running` of them.

FIFO mode starts requests in order of arrival, whoever sent them, within the same bounds.
Synchronous apart from `wait`: one event loop, no locks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class QueueFull(Exception):
    """This request would wait, and there is no room for it to; `scope` is "tenant" or "box"."""

    def __init__(self, scope: str, retry_after_s: float):
        super().__init__(scope)
        self.scope, self.retry_after_s = scope, retry_after_s


@dataclass(frozen=True)
class TenantLoad:
    queued: int
    running: int


@dataclass(eq=False)
class Turn:
    """One request's place: queued, then running, then done."""

    tenant: str
    prompt_tokens: int
    arrived: float
    fresh: bool = False  # its tenant had nothing queued or running when it came
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float | None = None
    done: bool = False


@dataclass(eq=False)
class _Tenant:
    name: str
    weight: float = 1.0
    max_concurrent: int | None = None
    counter: float = 0.0
    running: int = 0
    queue: deque[Turn] = field(default_factory=deque)

    @property
    def active(self) -> bool:
        return self.running > 0 or bool(self.queue)

    def may_start(self) -> bool:
        return bool(self.queue) and (self.max_concurrent is None or self.running < self.max_concurrent)


class FairScheduler:
    TYPICAL_RUN_S = 1.0  # the first guess for how long a request runs, before any has

    def __init__(
        self,
        max_running: int,
        max_queued: int,
        fair: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_running, self.max_queued, self.fair = max_running, max_queued, fair
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._active: dict[str, _Tenant] = {}  # with requests queued or running
        self._last_idle_counter = 0.0
        self.running = 0
        self.queued = 0
        self._typical_run_s = self.TYPICAL_RUN_S

    # -- admission --------------------------------------------------------------------------------

    def enter(
        self,
        tenant: str,
        *,
        weight: float,
        max_concurrent: int | None,
        max_queued: int,
        prompt_tokens: int,
    ) -> Turn:
        """Queue a request, starting it at once if it may; raises QueueFull (and leaves no trace)
        when it would have to wait and its tenant's queue, or the box's, is full."""
        state = self._tenants.get(tenant) or self._tenants.setdefault(tenant, _Tenant(tenant))
        state.weight, state.max_concurrent = weight, max_concurrent
        fresh = not state.active
        if fresh:
            self._wake_up(state)
        turn = Turn(tenant, prompt_tokens, self._clock(), fresh)
        state.queue.append(turn)
        self.queued += 1
        self._dispatch()
        if not turn.granted.done():
            if len(state.queue) > max_queued:
                self._withdraw(state, turn)
                raise QueueFull("tenant", self._retry_after(len(state.queue) + 1, max(1, state.running)))
            if self.queued > self.max_queued:
                self._withdraw(state, turn)
                raise QueueFull("box", self._retry_after(self.queued + 1, self.max_running))
        return turn

    async def wait(self, turn: Turn) -> None:
        """Until the request may run. Cancelled (client gone, server cut), it leaves the queue."""
        try:
            await asyncio.shield(turn.granted)
        except asyncio.CancelledError:
            if turn.granted.done():
                self.leave(turn)  # started just as its caller went away
            else:
                self._withdraw(self._tenants[turn.tenant], turn)
            raise

    def served(self, turn: Turn, completion_tokens: int) -> None:
        """Charge completion tokens as the engine produces them."""
        state = self._tenants[turn.tenant]
        state.counter += 2 * completion_tokens / state.weight

    def leave(self, turn: Turn) -> None:
        """The request ended (or never started: then it leaves the queue). Idempotent."""
        if turn.done:
            return
        state = self._tenants[turn.tenant]
        if turn.started is None:
            self._withdraw(state, turn)
            return
        turn.done = True
        state.running -= 1
        self.running -= 1
        ran = self._clock() - turn.started
        self._typical_run_s += 0.1 * (ran - self._typical_run_s)
        if not state.active:
            self._gone_idle(state)
        self._dispatch()

    # -- what telemetry reads ---------------------------------------------------------------------

    def load(self) -> dict[str, TenantLoad]:
        return {name: TenantLoad(len(t.queue), t.running) for name, t in self._active.items()}

    def tenant_load(self, tenant: str) -> TenantLoad:
        state = self._active.get(tenant)
        return TenantLoad(len(state.queue), state.running) if state else TenantLoad(0, 0)

    def counters(self) -> dict[str, float]:
        return {name: t.counter for name, t in self._tenants.items()}

    # -- inside -----------------------------------------------------------------------------------

    def _wake_up(self, state: _Tenant) -> None:
        """No banked credit: a tenant coming back starts where the others are now."""
        floor = min((t.counter for t in self._active.values()), default=self._last_idle_counter)
        state.counter = max(state.counter, floor)
        self._active[state.name] = state

    def _gone_idle(self, state: _Tenant) -> None:
        self._last_idle_counter = state.counter
        del self._active[state.name]

    def _withdraw(self, state: _Tenant, turn: Turn) -> None:
        if turn.done:
            return
        turn.done = True
        state.queue.remove(turn)
        self.queued -= 1
        if not state.active:
            self._gone_idle(state)
        self._dispatch()  # it may have been holding back others of its tenant

    def _order(self, state: _Tenant) -> tuple[float, float]:
        head = state.queue[0].arrived
        return (state.counter, head) if self.fair else (head, 0.0)

    def _dispatch(self) -> None:
        while True:
            ready = [t for t in self._active.values() if t.may_start()]
            if not ready:
                return
            if self.running < self.max_running:
                self._start(min(ready, key=self._order))
                continue
            returning = [t for t in ready if t.queue[0].fresh] if self.fair else []
            if not returning:
                return
            self._start(min(returning, key=self._order))

    def _start(self, state: _Tenant) -> None:
        turn = state.queue.popleft()
        self.queued -= 1
        state.running += 1
        self.running += 1
        state.counter += turn.prompt_tokens / state.weight
        turn.started = self._clock()
        turn.granted.set_result(None)

    def _retry_after(self, position: int, places: int) -> float:
        """A guess at when a place frees up for the request at `position`: runs end at about
        `places` per typical run."""
        return max(1.0, self._typical_run_s * position / places)
