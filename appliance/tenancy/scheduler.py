"""Which waiting request goes to the engine next: weighted fair across tenants (or FIFO).

Fair mode follows VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI'24). Each
tenant has a virtual token counter: the tokens it has been served, prompt + 2 x completion,
divided by its weight, charged as they are served (the prompt when the request starts, each
completion token as it comes). At most `max_running` requests run in the engine; when one ends,
the waiting request of the tenant with the lowest counter starts (a tenant's own requests in
arrival order). Work-conserving: a tenant alone gets every place. A tenant that had nothing
waiting or running starts at the lowest counter of those active (or, with none active, at the
counter of the last one to go idle): it banks no credit for the time it was away. A new weight (a
policy change; a quota throttle beginning or ending) restates the tenant's lead over the lowest
counter in the new weight, so what it was served counts at the weight it was served at.

Latency isolation: a tenant's share of the places is `max_running` x its weight / the weights of
the tenants active (at least one place). A tenant holding fewer places than its share starts its
next request at once, even when all `max_running` places are taken ("on top"), as long as its
counter is within one request (that request's prompt + 2 x max_tokens, over the weight) of the
lowest counter among the other tenants with requests waiting. So a tenant that keeps no more
requests in flight than its share never waits behind a flood, and one sending a request at a time
never waits at all (it comes back at the lowest counter, unless it was served more than the
others before it went idle). The flood's requests start again only once the total is back under
`max_running`. The engine then holds up to `max_running` + the sum of the shares, and never more
than twice `max_running` (with more tenants active than places, the starts on top stop there): a
place a light tenant frees goes to the flood before the light tenant's next request comes, which
then starts on top. Where that is more than the engine's batch, the requests on top wait inside
the engine, first in its line (the fair queue holds back everything else), for one of its running
requests to end.

The bound (for two tenants f and g waiting throughout an interval, fair mode): the service each
received, in the counters' units (prompt + 2 x completion, over the weight), differs by at most
(`max_running` + 1) x U, where U is one request's largest cost over the smaller weight. A tenant's
request starts only when its counter is the lowest, or within one request of the lowest of those
waiting; after that its counter grows by at most what its requests running then still cost, and it
has at most `max_running` of them.

The knob is `max_running`. More places give bigger batches (throughput) and bigger shares, but
every running request's steps get slower and the bound looser; fewer places give quicker steps
(each request's tokens come sooner) and a tighter bound, for less throughput. The default is the
engine's batch size: the queue then holds requests back only when the engine is full.

FIFO mode starts requests in order of arrival, whoever sent them, within the same bounds.
Synchronous apart from `wait`: one event loop, no locks.

The background band (batch lines) runs only in the capacity interactive requests leave. Rule: a
background request starts only when no interactive request could start (none waiting, or those
waiting held back by their tenant's `max_concurrent`), when interactive and background requests
running together are fewer than `max_running`, and when fewer than `max_background` background
requests run. Interactive requests do not count the background ones: one that arrives starts as
it would with no batch running (the fair queue never holds it back for a batch line); the engine
then holds up to `max_running` + `max_background`, and where that is more than its batch size the
newcomer waits inside the engine until a batch line ends. Within the band, tenants share by the
same rule as above (VTC counters of their own, the same weights; never on top). Bound: a
background request never delays an interactive one's start in the queue, and at most
`max_background` of the engine's places are taken by the band. Knob: `max_background`.
"""

from __future__ import annotations

import asyncio
import heapq
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
    background_queued: int = 0
    """The tenant's requests waiting in the background band (batch lines, flex requests)."""
    background_running: int = 0


@dataclass(eq=False)
class Turn:
    """One request's place: queued, then running, then done."""

    tenant: str
    prompt_tokens: int
    arrived: float
    max_tokens: int = 0
    background: bool = False
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
        max_background: int | None = None,
    ):
        self.max_running, self.max_queued, self.fair = max_running, max_queued, fair
        self.max_background = max_background
        """Background requests running at most; None: half of `max_running` (at least 1)."""
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}
        self._active: dict[str, _Tenant] = {}  # with requests queued or running
        self._band: dict[str, _Tenant] = {}  # the background band's own states
        self._band_active: dict[str, _Tenant] = {}
        self._last_idle_counter = 0.0
        self._band_last_idle_counter = 0.0
        self.running = 0
        self.queued = 0
        self.background_running = 0
        self.background_queued = 0
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
        max_tokens: int = 0,
        background: bool = False,
    ) -> Turn:
        """Queue a request, starting it at once if it may; raises QueueFull (and leaves no trace)
        when it would have to wait and its tenant's queue, or the box's, is full. A background
        request (the band) waits without a bound of the box's: its sender keeps its number bounded."""
        if background:
            return self._enter_band(tenant, weight, prompt_tokens, max_tokens, max_queued)
        state = self._tenants.get(tenant) or self._tenants.setdefault(tenant, _Tenant(tenant))
        if weight != state.weight:
            self._reweigh(state, weight)
        state.max_concurrent = max_concurrent
        if not state.active:
            self._wake_up(state)
        turn = Turn(tenant, prompt_tokens, self._clock(), max_tokens)
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

    def _enter_band(
        self, tenant: str, weight: float, prompt_tokens: int, max_tokens: int, max_queued: int
    ) -> Turn:
        state = self._band.get(tenant) or self._band.setdefault(tenant, _Tenant(tenant))
        if weight != state.weight:
            self._reweigh(state, weight)
        if not state.active:
            self._wake_up(state)
        turn = Turn(tenant, prompt_tokens, self._clock(), max_tokens, background=True)
        state.queue.append(turn)
        self.background_queued += 1
        self._dispatch()
        if not turn.granted.done() and len(state.queue) > max_queued:
            self._withdraw(state, turn)
            raise QueueFull("tenant", self._retry_after(len(state.queue) + 1, max(1, state.running)))
        return turn

    def _state(self, turn: Turn) -> _Tenant:
        return (self._band if turn.background else self._tenants)[turn.tenant]

    async def wait(self, turn: Turn) -> None:
        """Until the request may run. Cancelled (client gone, server cut), it leaves the queue."""
        try:
            await asyncio.shield(turn.granted)
        except asyncio.CancelledError:
            if turn.granted.done():
                self.leave(turn)  # started just as its caller went away
            else:
                self._withdraw(self._state(turn), turn)
            raise

    def served(self, turn: Turn, completion_tokens: int) -> None:
        """Charge completion tokens as the engine produces them."""
        state = self._state(turn)
        state.counter += 2 * completion_tokens / state.weight

    def leave(self, turn: Turn) -> None:
        """The request ended (or never started: then it leaves the queue). Idempotent."""
        if turn.done:
            return
        state = self._state(turn)
        if turn.started is None:
            self._withdraw(state, turn)
            return
        turn.done = True
        state.running -= 1
        if turn.background:
            self.background_running -= 1
        else:
            self.running -= 1
        ran = self._clock() - turn.started
        self._typical_run_s += 0.1 * (ran - self._typical_run_s)
        if not state.active:
            self._gone_idle(state)
        self._dispatch()

    # -- what telemetry reads ---------------------------------------------------------------------

    def load(self) -> dict[str, TenantLoad]:
        """Per tenant with requests queued or running, in either band."""
        return {name: self.tenant_load(name) for name in self._active.keys() | self._band_active.keys()}

    def tenant_load(self, tenant: str) -> TenantLoad:
        state, band = self._active.get(tenant), self._band_active.get(tenant)
        return TenantLoad(
            len(state.queue) if state else 0,
            state.running if state else 0,
            len(band.queue) if band else 0,
            band.running if band else 0,
        )

    def counters(self) -> dict[str, float]:
        return {name: t.counter for name, t in self._tenants.items()}

    # -- inside -----------------------------------------------------------------------------------

    def _reweigh(self, state: _Tenant, weight: float) -> None:
        """The lead over the lowest counter is service / old weight: restated as service / new
        weight. (A tenant throttled at the lowest weight would otherwise carry the lead it ran up
        there, a hundred times its service, into its next period, and wait behind every other.)"""
        floor = min((t.counter for t in self._peers(state).values()), default=state.counter)
        if state.counter > floor:
            state.counter = floor + (state.counter - floor) * state.weight / weight
        state.weight = weight

    def _wake_up(self, state: _Tenant) -> None:
        """No banked credit: a tenant coming back starts where the others are now."""
        band = self._in_band(state)
        last = self._band_last_idle_counter if band else self._last_idle_counter
        floor = min((t.counter for t in self._peers(state).values()), default=last)
        state.counter = max(state.counter, floor)
        self._peers(state)[state.name] = state

    def _gone_idle(self, state: _Tenant) -> None:
        if self._in_band(state):
            self._band_last_idle_counter = state.counter
        else:
            self._last_idle_counter = state.counter
        del self._peers(state)[state.name]

    def _in_band(self, state: _Tenant) -> bool:
        return self._band.get(state.name) is state

    def _peers(self, state: _Tenant) -> dict[str, _Tenant]:
        """The active states of the state's band (interactive, or background)."""
        return self._band_active if self._in_band(state) else self._active

    def _withdraw(self, state: _Tenant, turn: Turn) -> None:
        if turn.done:
            return
        turn.done = True
        state.queue.remove(turn)
        if turn.background:
            self.background_queued -= 1
        else:
            self.queued -= 1
        if not state.active:
            self._gone_idle(state)
        self._dispatch()  # it may have been holding back others of its tenant

    def _order(self, state: _Tenant) -> tuple[float, float]:
        head = state.queue[0].arrived
        return (state.counter, head) if self.fair else (head, 0.0)

    def _dispatch(self) -> None:
        self._dispatch_interactive()
        self._dispatch_band()

    @property
    def band_places(self) -> int:
        return self.max_background if self.max_background is not None else max(1, self.max_running // 2)

    def _dispatch_band(self) -> None:
        """Background requests, in what interactive ones leave (see the rule above). Interactive
        requests were dispatched first: one that could start still waits only when they hold
        `max_running` places, and then no background request starts either."""
        while (
            self.background_running < self.band_places
            and self.running + self.background_running < self.max_running
        ):
            ready = [t for t in self._band_active.values() if t.may_start()]
            if not ready:
                return
            self._start(min(ready, key=self._order))

    def _dispatch_interactive(self) -> None:
        while True:
            ready = [t for t in self._active.values() if t.may_start()]
            if not ready:
                return
            if self.running < self.max_running:
                self._start(min(ready, key=self._order))
                continue
            if not self.fair or self.running >= 2 * self.max_running:
                return
            below_share = self._below_share(ready)
            if not below_share:
                return
            self._start(min(below_share, key=self._order))

    def _below_share(self, ready: list[_Tenant]) -> list[_Tenant]:
        """Those of `ready` that may start on top: holding fewer places than their weight's share
        of `max_running` (at least one), and no further ahead of the lowest counter among the
        others waiting than one request. One pass over the tenants, not one per tenant."""
        weights = sum(t.weight for t in self._active.values())
        lowest = heapq.nsmallest(2, ready, key=lambda t: t.counter)  # of those that could start
        chosen = []
        for state in ready:
            if state.running >= max(1, int(self.max_running * state.weight / weights)):
                continue
            head = state.queue[0]
            reach = (head.prompt_tokens + 2 * head.max_tokens) / state.weight
            others = [t for t in lowest if t is not state]
            if not others or state.counter <= others[0].counter + reach:
                chosen.append(state)
        return chosen

    def _start(self, state: _Tenant) -> None:
        turn = state.queue.popleft()
        state.running += 1
        if turn.background:
            self.background_queued -= 1
            self.background_running += 1
        else:
            self.queued -= 1
            self.running += 1
        state.counter += turn.prompt_tokens / state.weight
        turn.started = self._clock()
        turn.granted.set_result(None)

    def _retry_after(self, position: int, places: int) -> float:
        """A guess at when a place frees up for the request at `position`: runs end at about
        `places` per typical run."""
        return max(1.0, self._typical_run_s * position / places)
