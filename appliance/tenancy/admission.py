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

Every response carries OpenAI's `x-ratelimit-*` headers for the limits the tenant has. When the
request ends, `Ticket.finish` settles: unused reserved tokens go back to the tokens bucket, and
the quota counts what the request used (what its ledger row books).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .policy import Policy
from .policybook import PolicyBook
from .quota import QuotaMeter
from .ratelimit import Bucket, duration
from .scheduler import FairScheduler, QueueFull, TenantLoad, Turn

QUOTA_WARNING_HEADER = "x-lorabox-quota-warning"


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


@dataclass
class _Buckets:
    requests: Bucket | None = None
    tokens: Bucket | None = None


def _fitted(bucket: Bucket | None, limit: int | None, now: float) -> Bucket | None:
    if limit is None:
        return None
    if bucket is None:
        return Bucket(limit, now)
    if bucket.limit != limit:
        bucket.resize(limit, now)
    return bucket


class Ticket:
    """One admitted request: its place in the queue, and what it reserved."""

    def __init__(
        self, admission: Admission, policy: Policy, turn: Turn, reserved: int, headers: dict[str, str]
    ):
        self._admission, self.policy, self._turn = admission, policy, turn
        self.reserved = reserved
        self.headers = headers
        self._finished = False

    @property
    def tenant(self) -> str:
        return self._turn.tenant

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


class Admission:
    def __init__(
        self,
        policies: PolicyBook,
        quota: QuotaMeter,
        scheduler: FairScheduler,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.policies, self.quota, self.scheduler = policies, quota, scheduler
        self._clock = clock
        self._buckets: dict[str, _Buckets] = {}

    def policy_for(self, tenant: str) -> Policy:
        return self.policies.get(tenant)

    def _fit(self, tenant: str, policy: Policy, now: float) -> _Buckets:
        buckets = self._buckets.get(tenant) or self._buckets.setdefault(tenant, _Buckets())
        buckets.requests = _fitted(buckets.requests, policy.rpm, now)
        buckets.tokens = _fitted(buckets.tokens, policy.tpm, now)
        return buckets

    def check_requests(self, tenant: str) -> None:
        """Before reading a body: a tenant out of requests is refused without more work."""
        now = self._clock()
        buckets = self._fit(tenant, self.policies.get(tenant), now)
        if buckets.requests is not None and (wait := buckets.requests.wait_s(1, now)) > 0:
            raise self._too_many(buckets, wait, now, "requests")

    def admit(self, tenant: str, prompt_tokens: int, max_tokens: int) -> Ticket:
        """Reserve and queue one request, or raise Refusal. Nothing is kept when it is refused."""
        policy = self.policies.get(tenant)
        reserve = prompt_tokens + max_tokens
        now = self._clock()
        buckets = self._fit(tenant, policy, now)
        waits = {
            "requests": buckets.requests.wait_s(1, now) if buckets.requests else 0.0,
            "tokens": buckets.tokens.wait_s(reserve, now) if buckets.tokens else 0.0,
        }
        if waits["tokens"] == math.inf:
            raise Refusal(
                429,
                "rate_limit_exceeded",
                f"Request too large: it reserves {reserve} tokens (prompt {prompt_tokens} + max_tokens "
                f"{max_tokens}), more than the limit of {policy.tpm} tokens per minute. Lower max_tokens "
                "or shorten the prompt.",
                should_retry=False,
                headers=self._headers(buckets, now),
            )
        kind, wait = max(waits.items(), key=lambda item: item[1])
        if wait > 0:
            raise self._too_many(buckets, wait, now, kind)

        quota = self.quota.check(tenant, policy, reserve)
        if not quota.fits:
            raise Refusal(
                429,
                "insufficient_quota",
                f"You exceeded your quota: {self._quota_text(tenant, policy)}; this request could use "
                f"{reserve} tokens more (prompt + max_tokens). Lower max_tokens, or wait for the next "
                f"{policy.quota_period}.",
                should_retry=False,
                headers=self._headers(buckets, now),
            )

        try:
            turn = self.scheduler.enter(
                tenant,
                weight=policy.weight,
                max_concurrent=policy.max_concurrent,
                max_queued=policy.max_queued,
                prompt_tokens=prompt_tokens,
                max_tokens=max_tokens,
            )
        except QueueFull as full:
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
                headers=self._headers(buckets, now),
            ) from None

        if buckets.requests:
            buckets.requests.take(1, now)
        if buckets.tokens:
            buckets.tokens.take(reserve, now)
        self.quota.reserve(tenant, reserve)
        headers = self._headers(buckets, now)
        if quota.warn:
            headers[QUOTA_WARNING_HEADER] = quota.warn
        return Ticket(self, policy, turn, reserve, headers)

    def settle(self, ticket: Ticket, used: int) -> None:
        buckets = self._buckets.get(ticket.tenant)
        if buckets is not None and buckets.tokens is not None:
            buckets.tokens.give_back(max(0, ticket.reserved - used), self._clock())
        self.quota.settle(ticket.tenant, self.policies.get(ticket.tenant), ticket.reserved, used)

    def _too_many(self, buckets: _Buckets, wait: float, now: float, kind: str) -> Refusal:
        return Refusal(
            429,
            "rate_limit_exceeded",
            f"Rate limit reached for {kind} per minute. Retry in {duration(wait)}.",
            retry_after_s=wait,
            headers=self._headers(buckets, now),
        )

    def headers(self, tenant: str) -> dict[str, str]:
        """The `x-ratelimit-*` headers as the tenant's limits stand now."""
        now = self._clock()
        return self._headers(self._fit(tenant, self.policies.get(tenant), now), now)

    def _headers(self, buckets: _Buckets, now: float) -> dict[str, str]:
        headers = {}
        for kind, bucket in (("requests", buckets.requests), ("tokens", buckets.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(bucket.limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(bucket.remaining(now))
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.full_in_s(now))
        return headers

    def _quota_text(self, tenant: str, policy: Policy) -> str:
        view = self.quota.view(tenant, policy)
        return f"{view['used_tokens']} of {view['limit_tokens']} tokens used this {policy.quota_period}"

    # -- what telemetry and the admin API read ----------------------------------------------------

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
            "policy": self.policy_view(tenant),
            "quota": self.quota_view(tenant),
        }

    def policy_view(self, tenant: str) -> dict[str, Any]:
        """The admin API's `policy` object: the effective policy, None for "no limit"."""
        return self.policies.get(tenant).view()

    def quota_view(self, tenant: str) -> dict[str, Any]:
        """The admin API's `quota` object (limit and pct None when the tenant has no quota)."""
        return self.quota.view(tenant, self.policies.get(tenant))
