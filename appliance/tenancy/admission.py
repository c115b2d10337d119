"""Admission, before the engine: rate limits, then quota, then the queue; and the settling after.

The API has already checked the key (tenant), found the policy and applied its request caps
(max_tokens). `admit` then decides in one synchronous step, so no other request can come between
a check and its reservation:

1. rate limits: one request from the requests bucket, prompt + max_tokens from the tokens bucket
   (ratelimit.py); short of either, 429 `rate_limit_exceeded` with the exact wait;
2. quota: prompt + max_tokens must fit beside what was used and what others reserved in the
   period (quota.py); else 429 `insufficient_quota`, not to be retried;
3. queue: the fair scheduler starts the request or queues it (scheduler.py); a full tenant queue
   is 429, a full box 503, both with Retry-After.

Steps 1 and 2 are the counters' (limits.py): this box's own (`LocalLimits`), or, with a shared
backend (`limits_backend` = a Redis URL), every box's at once. Then `admit_shared` awaits the
shared take (one atomic script; the event loop serves others meanwhile) and does step 3 the same
way; the local counters mirror this box's share. When the shared counters do not answer,
`limits_fail_mode` decides: "open" admits with the local counters (this box's share, plus what the
other boxes had used of the quota when last heard of), "closed" refuses with 503.

Throttling instead of refusing (`quota_action = "throttle"`, `Standing`). Rule: a request that
would take its tenant past the quota (used + reserved + its own reservation) is served all the same,
under the throttle's limits: requests and tokens per minute of at most `throttle_rpm` /
`throttle_tpm` (the tenant's own buckets, shrunk: no burst is granted on the way in), and the lowest
fair-share weight, so a throttled tenant takes only what the others leave. Bound: its use never
passes `quota_hard_pct` of the quota (that ceiling is what the counters check, exactly as they
check the quota under `reject`). Knobs: the three policy fields. Every response to a throttled
tenant says so (`x-lorabox-quota-state: throttled`), the first in a period is an event.

Every response carries OpenAI's `x-ratelimit-*` headers for the limits the tenant has. When the
request ends, `Ticket.finish` settles: unused reserved tokens go back to the tokens bucket, and
the quota counts what the request used (what its ledger row books).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .limits import Ask, Counted, Levels, LimitsUnavailable, LocalLimits, SharedLimits
from .policy import Policy
from .policybook import PolicyBook
from .quota import QuotaMeter, warning
from .ratelimit import duration
from .scheduler import FairScheduler, QueueFull, TenantLoad, Turn

QUOTA_WARNING_HEADER = "x-lorabox-quota-warning"
QUOTA_STATE_HEADER = "x-lorabox-quota-state"
BATCH = "batch"
BACKGROUND = frozenset({BATCH, "flex"})
"""The tiers that run in the scheduler's background band: batch lines, and interactive requests
that ask for it (`service_tier: "flex"`)."""
THROTTLED_WEIGHT = 0.01
"""A throttled tenant's fair-share weight: the lowest a policy may set (policy.py)."""
LIMITS_RETRY_S = 1.0
"""Retry-After of a request refused because the shared counters do not answer (fail closed)."""


@dataclass(eq=False)
class Refusal(Exception):
    """A request admission turns away, with its HTTP status and OpenAI error code."""

    status: int
    code: str
    message: str
    retry_after_s: float | None = None
    should_retry: bool = True
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)


def _lower(limit: int | None, cap: int | None) -> int | None:
    """The stricter of two limits (None: no limit)."""
    return cap if limit is None else limit if cap is None else min(limit, cap)


@dataclass(frozen=True)
class Standing:
    """The limits a tenant's next request is admitted under: its policy's, or the throttle's."""

    rpm: int | None
    tpm: int | None
    weight: float
    quota_tokens: int | None
    """What the counters check the reservation against: the quota, or (throttling) its hard ceiling."""
    throttled: bool = False

    def headers(self) -> dict[str, str]:
        return {QUOTA_STATE_HEADER: "throttled"} if self.throttled else {}


@dataclass(frozen=True)
class KeyLimits:
    """A service key's own limits, on top of those of the tenant it acts for. Counted by this box
    alone (also with shared counters: they hold tenants' limits), in buckets of their own."""

    key_id: str
    rpm: int | None = None
    tpm: int | None = None

    def ask(self, tokens: int) -> Ask:
        # "key:" cannot begin a tenant name (names.py): these buckets are never a tenant's.
        return Ask(f"key:{self.key_id}", tokens, rpm=self.rpm, tpm=self.tpm, counts_quota=False)


def _undo(shared: SharedLimits, ask: Ask, take: asyncio.Future[Counted]) -> None:
    """A shared take whose request was gone before it was answered: give it back if it was taken."""
    if not take.cancelled() and take.exception() is None and take.result().taken:
        shared.settle(ask, 0, bucket=True, requests=1)


class Ticket:
    """One admitted request: its place in the queue, and what it reserved."""

    def __init__(
        self,
        admission: Admission,
        policy: Policy,
        turn: Turn,
        ask: Ask,
        headers: dict[str, str],
        shared: bool,
        model: str = "",
        key_ask: Ask | None = None,
    ):
        self._admission, self.policy, self._turn = admission, policy, turn
        self.ask = ask
        self.key_ask = key_ask
        """What it took from its service key's own buckets, if the key has limits."""
        self.headers = headers
        self.shared = shared
        """Its reservation was taken from the shared counters (not the local ones, failing open)."""
        self.model = model
        """The adapter as the request named it in `model` ("" for the base model)."""
        self._finished = False

    @property
    def tenant(self) -> str:
        return self._turn.tenant

    @property
    def reserved(self) -> int:
        return self.ask.tokens

    @property
    def background(self) -> bool:
        """It waits in (and runs in) the scheduler's background band: a batch line, or flex."""
        return self._turn.background

    @property
    def started(self) -> bool:
        """The fair queue let it go to the engine."""
        return self._turn.started is not None

    async def wait(self) -> None:
        """Until the scheduler starts this request."""
        await self._admission.scheduler.wait(self._turn)

    def served(self, completion_tokens: int) -> None:
        self._admission.scheduler.served(self._turn, completion_tokens)

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The request is over (or never ran); idempotent. Give back what it reserved and did not use."""
        if self._finished:
            return
        self._finished = True
        self._admission.settle(self, prompt_tokens + completion_tokens)
        self._admission.scheduler.leave(self._turn)
        self._admission.tickets.pop(self, None)


class Admission:
    def __init__(
        self,
        policies: PolicyBook,
        quota: QuotaMeter,
        scheduler: FairScheduler,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedLimits | None = None,
    ):
        self.policies, self.quota, self.scheduler = policies, quota, scheduler
        self._clock = clock
        self.local = LocalLimits(quota, clock)
        self.shared = shared
        self._seen: dict[str, Levels] = {}  # the shared buckets' levels, as last answered per tenant
        self.tickets: dict[Ticket, None] = {}  # admitted on an adapter and not finished, in order
        self.throttled: Counter[str] = Counter()  # requests admitted throttled, per tenant (/metrics)

    def policy_for(self, tenant: str) -> Policy:
        return self.policies.get(tenant)

    def standing(self, tenant: str, policy: Policy, tokens: int = 0) -> Standing:
        """The limits a request reserving `tokens` is admitted under (see the module's docstring).
        Whether it would pass the quota is judged from this box's meter: with shared counters, from
        what the other boxes had used when last heard of."""
        quota = policy.quota_tokens
        if quota is None or policy.quota_action == "reject":
            return Standing(policy.rpm, policy.tpm, policy.weight, quota)
        hard = policy.quota_hard_pct
        ceiling = None if hard is None else math.floor(quota * hard / 100)
        used = self.quota.used(tenant, policy.quota_period) + self.quota.reserved(tenant)
        if used + tokens <= quota and used < quota:
            return Standing(policy.rpm, policy.tpm, policy.weight, ceiling)
        rpm, tpm = _lower(policy.rpm, policy.throttle_rpm), _lower(policy.tpm, policy.throttle_tpm)
        return Standing(rpm, tpm, min(policy.weight, THROTTLED_WEIGHT), ceiling, throttled=True)

    def _levels(self, tenant: str, standing: Standing) -> Levels:
        """The tenant's bucket levels as best known: the shared counters' last answer (aged), else
        this box's own."""
        if self.shared is not None and self.shared.down is None:
            seen = self._seen.get(tenant)
            if seen is not None and (seen.rpm, seen.tpm) == (standing.rpm, standing.tpm):
                return seen
        return self.local.levels(tenant, standing.rpm, standing.tpm)

    def check_requests(self, tenant: str, key: KeyLimits | None = None) -> None:
        """Before reading a body: a tenant (or service key) out of requests is refused without more
        work. (With shared counters, from their last answer: other boxes only ever take more, so it
        cannot be wrong.)"""
        policy = self.policies.get(tenant)
        standing = self.standing(tenant, policy)
        now = self._clock()
        levels = self._levels(tenant, standing)
        level = levels.level("requests", now)
        if level is not None and standing.rpm is not None and level < 1:
            raise self._too_many(levels, (1 - level) * 60.0 / standing.rpm, now, "requests", standing)
        if key is not None and key.rpm is not None:
            levels = self.local.levels(key.ask(0).tenant, key.rpm, key.tpm)
            level = levels.level("requests", now)
            if level is not None and level < 1:
                raise self._key_too_many(levels, (1 - level) * 60.0 / key.rpm, now, "requests")

    def _take_key(self, key: KeyLimits | None, tokens: int) -> Ask | None:
        """Take a request from its service key's own buckets (when it has limits), or raise Refusal."""
        if key is None or (key.rpm is None and key.tpm is None):
            return None
        ask = key.ask(tokens)
        now = self._clock()
        if key.tpm is not None and tokens > key.tpm:
            raise Refusal(
                429,
                "rate_limit_exceeded",
                f"Request too large: it reserves {tokens} tokens, more than this service key's limit of "
                f"{key.tpm} tokens per minute. Lower max_tokens or shorten the prompt.",
                should_retry=False,
            )
        counted = self.local.take(ask)
        if not counted.taken:
            kind, wait = max(counted.waits.items(), key=lambda item: item[1])
            raise self._key_too_many(counted.levels, wait, now, kind)
        return ask

    def _key_too_many(self, levels: Levels, wait: float, now: float, kind: str) -> Refusal:
        return Refusal(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for {kind} per minute on this service key. Retry in {duration(wait)}.",
            retry_after_s=wait,
            headers=levels.headers(now),
        )

    def _ask(
        self, tenant: str, policy: Policy, prompt_tokens: int, max_tokens: int, tier: str = "default"
    ) -> tuple[Ask, Standing]:
        """What the request asks of the counters, under which limits; refuses at once one that no
        limit could ever fit. A batch line's ask has no rate limits (they are interactive traffic's)."""
        tokens = prompt_tokens + max_tokens
        standing = self.standing(tenant, policy, tokens)
        limited = tier != BATCH
        ask = Ask(
            tenant,
            tokens,
            rpm=standing.rpm if limited else None,
            tpm=standing.tpm if limited else None,
            quota_tokens=standing.quota_tokens,
            quota_period=policy.quota_period,
            rate_limited=limited,
        )
        if ask.tpm is not None and ask.tokens > ask.tpm:
            raise Refusal(
                429,
                "rate_limit_exceeded",
                f"Request too large: it reserves {ask.tokens} tokens (prompt {prompt_tokens} + max_tokens "
                f"{max_tokens}), more than the limit of {standing.tpm} tokens per minute. Lower max_tokens "
                "or shorten the prompt.",
                should_retry=False,
                headers=self.headers(tenant),
            )
        return ask, standing

    def admit(
        self,
        tenant: str,
        prompt_tokens: int,
        max_tokens: int,
        model: str = "",
        key: KeyLimits | None = None,
        tier: str = "default",
    ) -> Ticket:
        """Reserve and queue one request with this box's counters, or raise Refusal. Nothing is kept
        when it is refused. `model`: the adapter as the request names it ("" for the base model);
        `key`: the service key's own limits, when a service key sent it; `tier`: `default`, or
        `flex` (an interactive request queued in the scheduler's background band) or `batch` (a
        batch line: the background band, and no rate limits)."""
        policy = self.policies.get(tenant)
        ask, standing = self._ask(tenant, policy, prompt_tokens, max_tokens, tier)
        key_ask = self._take_key(key, ask.tokens)
        try:
            enter = self._entry(ask, standing, prompt_tokens, max_tokens, model, key_ask, tier)
            return enter(policy, self.local.take(ask), shared=False)
        except BaseException:
            self._give_back_key(key_ask)
            raise

    async def admit_shared(
        self,
        tenant: str,
        prompt_tokens: int,
        max_tokens: int,
        model: str = "",
        key: KeyLimits | None = None,
        tier: str = "default",
    ) -> Ticket:
        """`admit` with the shared counters (there must be some): the take is awaited; when they do
        not answer, the local counters serve (fail open) or the request gets 503 (fail closed)."""
        shared = self.shared
        assert shared is not None, "no shared limits backend"
        policy = self.policies.get(tenant)
        ask, standing = self._ask(tenant, policy, prompt_tokens, max_tokens, tier)
        key_ask = self._take_key(key, ask.tokens)
        enter = self._entry(ask, standing, prompt_tokens, max_tokens, model, key_ask, tier)
        try:
            if shared.down is None:
                take = asyncio.ensure_future(shared.take(ask))
                try:
                    counted = await asyncio.shield(take)
                except LimitsUnavailable:
                    pass  # the backend says so in the log, once, and now answers `down`
                except asyncio.CancelledError:  # the client left: what the take took goes back
                    take.add_done_callback(functools.partial(_undo, shared, ask))
                    raise
                else:  # the policy as it is now, after the wait
                    return enter(self.policies.get(tenant), counted, shared=True)
            if shared.fail_open:
                return enter(policy, self.local.take(ask), shared=False)
            raise Refusal(
                503,
                "limits_unavailable",
                f"The server cannot check its rate limits and quotas now ({shared.down}). Retry shortly.",
                retry_after_s=LIMITS_RETRY_S,
                headers=self.headers(tenant),
            )
        except BaseException:
            self._give_back_key(key_ask)
            raise

    def _give_back_key(self, key_ask: Ask | None) -> None:
        """A request that took from its service key's buckets was refused after all: all goes back."""
        if key_ask is not None:
            self.local.give_back(key_ask, 0, requests=1)

    def _entry(
        self,
        ask: Ask,
        standing: Standing,
        prompt_tokens: int,
        max_tokens: int,
        model: str,
        key_ask: Ask | None,
        tier: str,
    ) -> Callable[..., Ticket]:
        """Step 3 for this request, once its counters have answered: `enter(policy, counted, shared=)`."""
        return functools.partial(
            self._enter,
            ask,
            standing,
            prompt_tokens,
            max_tokens,
            model,
            key_ask,
            background=tier in BACKGROUND,
        )

    def _enter(
        self,
        ask: Ask,
        standing: Standing,
        prompt_tokens: int,
        max_tokens: int,
        model: str,
        key_ask: Ask | None,
        policy: Policy,
        counted: Counted,
        *,
        shared: bool,
        background: bool = False,
    ) -> Ticket:
        """Step 3, for a request whose counters answered: refuse what they did not take, else queue."""
        now = self._clock()
        if shared:
            self._seen[ask.tenant] = counted.levels
        headers = counted.levels.headers(now) | standing.headers()
        if not counted.taken:
            raise self._refusal(ask, policy, standing, counted, headers, now)
        try:
            turn = self.scheduler.enter(
                ask.tenant,
                weight=standing.weight,
                max_concurrent=policy.max_concurrent,
                max_queued=policy.max_queued,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
                background=background,
            )
        except QueueFull as full:
            self._give_back(ask, 0, shared=shared, requests=1)
            if full.scope == "tenant":
                status, message = 429, f"Too many requests waiting: at most {policy.max_queued} may queue."
            else:
                status, message = (
                    503,
                    "The server is at capacity: too many requests are waiting. Retry shortly.",
                )
            raise Refusal(
                status,
                "rate_limit_exceeded" if status == 429 else "server_overloaded",
                message,
                retry_after_s=full.retry_after_s,
                headers=headers,
            ) from None
        if shared:  # this box's share, in its own counters too: they serve when the shared do not
            self.local.take(ask, force=True)
            elsewhere = counted.quota_used - self.quota.own(ask.tenant, ask.quota_period)
            self.quota.set_elsewhere(ask.tenant, ask.quota_period, elsewhere)
        if warn := warning(policy, counted.quota_used):
            headers[QUOTA_WARNING_HEADER] = warn
        if standing.throttled:
            self.throttled[ask.tenant] += 1
            self.quota.note_throttled(ask.tenant, policy)
        ticket = Ticket(self, policy, turn, ask, headers, shared, model, key_ask)
        if model:
            self.tickets[ticket] = None
        return ticket

    def _refusal(
        self,
        ask: Ask,
        policy: Policy,
        standing: Standing,
        counted: Counted,
        headers: dict[str, str],
        now: float,
    ) -> Refusal:
        kind, wait = max(counted.waits.items(), key=lambda item: item[1])
        if wait > 0:
            return self._too_many(counted.levels, wait, now, kind, standing)
        ceiling = (
            f" ({policy.quota_hard_pct:g}% of the quota of {policy.quota_tokens}: its hard ceiling)"
            if ask.quota_tokens != policy.quota_tokens
            else ""
        )
        return Refusal(
            429,
            "insufficient_quota",
            f"You exceeded your quota: {counted.quota_used} of {ask.quota_tokens} tokens{ceiling} used this "
            f"{policy.quota_period}; this request could use {ask.tokens} tokens more (prompt + "
            f"max_tokens). Lower max_tokens, or wait for the next {policy.quota_period}.",
            should_retry=False,
            headers=headers,
        )

    def _give_back(self, ask: Ask, used: int, *, shared: bool, requests: int = 0) -> None:
        self.local.give_back(ask, used, requests=requests)
        self.quota.settle(ask.tenant, self.policies.get(ask.tenant), ask.tokens, used)
        if self.shared is not None:
            # Whichever counters took it: a reservation made while failing open was written to the
            # shared counters when they came back (redislimits.py), and is settled there too.
            self.shared.settle(ask, used, bucket=shared, requests=requests)

    def settle(self, ticket: Ticket, used: int) -> None:
        self._give_back(ticket.ask, used, shared=ticket.shared)
        if ticket.key_ask is not None:
            self.local.give_back(ticket.key_ask, used)

    def _too_many(self, levels: Levels, wait: float, now: float, kind: str, standing: Standing) -> Refusal:
        throttled = " (throttled: the quota is used up)" if standing.throttled else ""
        return Refusal(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for {kind} per minute{throttled}. Retry in {duration(wait)}.",
            retry_after_s=wait,
            headers=levels.headers(now) | standing.headers(),
        )

    def headers(self, tenant: str) -> dict[str, str]:
        """The `x-ratelimit-*` headers as the tenant's limits stand now (and its quota state, when
        throttled)."""
        standing = self.standing(tenant, self.policies.get(tenant))
        return self._levels(tenant, standing).headers(self._clock()) | standing.headers()

    # -- what telemetry and the admin API read ----------------------------------------------------

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """The adapters (as requests name them in `model`) with requests running, and with requests
        waiting in the fair queue: the model server protocol's running and waiting LoRA adapters."""
        running: set[str] = set()
        waiting: set[str] = set()
        for ticket in self.tickets:
            (running if ticket.started else waiting).add(ticket.model)
        return sorted(running), sorted(waiting)

    def limits_state(self) -> dict[str, Any]:
        """Where the counters are: `{"backend": "local"}`, or the shared backend's state."""
        return {"backend": "local"} if self.shared is None else self.shared.state()

    def limits_problem(self) -> tuple[str, bool] | None:
        """While the shared counters do not answer: (what to say, whether requests are refused)."""
        shared = self.shared
        if shared is None or shared.down is None:
            return None
        if shared.fail_open:
            return f"shared limits unavailable ({shared.down}): counting on this box alone", False
        return (
            f"shared limits unavailable ({shared.down}): refusing requests (limits_fail_mode = closed)",
            True,
        )

    def load(self) -> dict[str, TenantLoad]:
        """Requests queued and running per tenant (tenants with neither are left out)."""
        return self.scheduler.load()

    @property
    def queued(self) -> int:
        return self.scheduler.queued

    @property
    def running(self) -> int:
        return self.scheduler.running

    def tenant_load(self, tenant: str) -> dict[str, Any]:
        """One tenant's row for the admin API's /admin/tenants (api/overview.py's TenantLoad):
        requests running and queued, the effective policy and the quota use."""
        load = self.scheduler.tenant_load(tenant)
        return {
            "running": load.running,
            "queued": load.queued,
            "background_running": load.background_running,
            "background_queued": load.background_queued,
            "policy": self.policy_view(tenant),
            "quota": self.quota_view(tenant),
        }

    def policy_view(self, tenant: str) -> dict[str, Any]:
        """The admin API's `policy` object: the effective policy, None for "no limit"."""
        return self.policies.get(tenant).view()

    def quota_view(self, tenant: str) -> dict[str, Any]:
        """The admin API's `quota` object (limit and pct None when the tenant has no quota)."""
        policy = self.policies.get(tenant)
        state = "throttled" if self.standing(tenant, policy).throttled else "ok"
        return self.quota.view(tenant, policy) | {"state": state}
