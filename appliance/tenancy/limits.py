"""Admission's counters: requests and tokens per minute, and the quota's tokens, behind one interface.

A backend answers one question, `take(ask)`: may this request take what it asks for (one request,
prompt + max_tokens tokens) under its tenant's limits, and if not, what is short? When everything
fits it takes it, in the same step, so nothing comes between a check and its reservation. It
decides nothing else: refusing, queueing or throttling is admission's (admission.py). Two backends:

- `LocalLimits` (`limits_backend = "local"`, the default): this box's memory. Token buckets per
  tenant and kind (ratelimit.py) and the quota meter (quota.py); synchronous, on the event loop.
- `RedisLimits` (`limits_backend = "redis://..."`, redislimits.py): the same counters in Redis,
  shared by every box, each take one atomic Lua script, awaited. Admission keeps a `LocalLimits`
  beside it all the same, as the mirror of this box's own share and the fallback when Redis does
  not answer (`limits_fail_mode`).

The algorithm is the same in both: a token bucket of `limit` units per tenant and kind, refilled by
`limit / 60` a second (a burst of `limit`, then `limit` a minute), reservations given back at
settlement; and a quota reserved at admission, settled to what the request used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import LoraboxError
from .quota import QuotaMeter
from .ratelimit import Bucket, duration

KINDS = ("requests", "tokens")


@dataclass(frozen=True)
class Ask:
    """What one request asks of its tenant's counters, with the limits that apply (None: no limit)."""

    tenant: str
    tokens: int
    """prompt + max_tokens: reserved against the tokens per minute and the quota."""
    rpm: int | None = None
    tpm: int | None = None
    quota_tokens: int | None = None
    """The quota the reservation must fit in. None: the tokens are counted, not checked."""
    quota_period: str = "month"
    counts_quota: bool = True
    """False for a service key's own buckets (admission.KeyLimits): rate limits only, no quota."""
    rate_limited: bool = True
    """False for a batch line: counted against the quota, never against the tenant's requests and
    tokens per minute (those limit interactive traffic), and the buckets are left as they are."""


@dataclass(frozen=True)
class Levels:
    """What a tenant's buckets hold, as of `at` (the box's monotonic clock); None: no such limit."""

    requests: float | None
    tokens: float | None
    rpm: int | None
    tpm: int | None
    at: float

    def level(self, kind: str, now: float) -> float | None:
        """The bucket's level at `now`, refilled since `at` (no box but this one knows of takes since:
        others only ever lower it, so this is an upper bound of the shared level)."""
        level, limit = (self.requests, self.rpm) if kind == "requests" else (self.tokens, self.tpm)
        if level is None or limit is None:
            return None
        return min(float(limit), level + max(0.0, now - self.at) * limit / 60.0)

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits there are."""
        headers = {}
        for kind, limit in (("requests", self.rpm), ("tokens", self.tpm)):
            level = self.level(kind, now)
            if level is None or limit is None:
                continue
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(level)))
            headers[f"x-ratelimit-reset-{kind}"] = duration(max(0.0, (limit - level) * 60.0 / limit))
        return headers


@dataclass(frozen=True)
class Counted:
    """A backend's answer to one ask."""

    taken: bool
    waits: dict[str, float]
    """Seconds until each rate limit has room for the ask: 0 now, inf never (more than the limit)."""
    quota_fits: bool
    """The reservation fits in the quota beside what is used and reserved (always, without one)."""
    quota_used: int
    """Tokens used this quota period, by every box the backend counts for."""
    quota_reserved: int
    """Tokens reserved by requests admitted and not yet settled (this one included once taken)."""
    levels: Levels


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


@dataclass
class LocalLimits:
    """This box's counters, in memory: exact for the requests this box admits, and nothing else."""

    quota: QuotaMeter
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Buckets] = field(default_factory=dict)

    def _fit(self, tenant: str, rpm: int | None, tpm: int | None, now: float) -> _Buckets:
        buckets = self._buckets.get(tenant) or self._buckets.setdefault(tenant, _Buckets())
        buckets.requests = _fitted(buckets.requests, rpm, now)
        buckets.tokens = _fitted(buckets.tokens, tpm, now)
        return buckets

    def take(self, ask: Ask, *, force: bool = False) -> Counted:
        """Take the ask if everything fits (or, with `force`, whatever the levels: the mirror of a
        take another backend granted). The waits say what is short."""
        now = self.clock()
        buckets = self._fit(ask.tenant, ask.rpm, ask.tpm, now) if ask.rate_limited else _Buckets()
        waits = {
            "requests": buckets.requests.wait_s(1, now) if buckets.requests else 0.0,
            "tokens": buckets.tokens.wait_s(ask.tokens, now) if buckets.tokens else 0.0,
        }
        used = self.quota.used(ask.tenant, ask.quota_period) if ask.counts_quota else 0
        reserved = self.quota.reserved(ask.tenant) if ask.counts_quota else 0
        fits = ask.quota_tokens is None or used + reserved + ask.tokens <= ask.quota_tokens
        taken = force or (fits and not any(waits.values()))
        if taken:
            if buckets.requests:
                buckets.requests.take(1, now)
            if buckets.tokens:
                buckets.tokens.take(ask.tokens, now)
            if ask.counts_quota:
                self.quota.reserve(ask.tenant, ask.tokens)
                reserved += ask.tokens
        return Counted(taken, waits, fits, used, reserved, self._levels(buckets, ask, now))

    def give_back(self, ask: Ask, used: int, *, requests: int = 0) -> None:
        """A taken ask ends having used `used` tokens: the rest of the reservation goes back to the
        tokens bucket (and `requests` to the requests bucket: a request that never ran)."""
        now = self.clock()
        buckets = self._buckets.get(ask.tenant) if ask.rate_limited else None
        if buckets is not None and buckets.tokens is not None:
            buckets.tokens.give_back(max(0, ask.tokens - used), now)
        if buckets is not None and buckets.requests is not None and requests:
            buckets.requests.give_back(requests, now)

    def levels(self, tenant: str, rpm: int | None, tpm: int | None) -> Levels:
        now = self.clock()
        buckets = self._fit(tenant, rpm, tpm, now)
        return Levels(
            buckets.requests.level(now) if buckets.requests else None,
            buckets.tokens.level(now) if buckets.tokens else None,
            rpm,
            tpm,
            now,
        )

    @staticmethod
    def _levels(buckets: _Buckets, ask: Ask, now: float) -> Levels:
        return Levels(
            buckets.requests.level(now) if buckets.requests else None,
            buckets.tokens.level(now) if buckets.tokens else None,
            ask.rpm,
            ask.tpm,
            now,
        )


class LimitsUnavailable(LoraboxError):
    """The shared counters did not answer in time (or at all); the message says why."""


class SharedLimits(Protocol):
    """Counters shared by several boxes (redislimits.py). Every call is bounded by a short timeout:
    the event loop never waits on them for longer."""

    fail_open: bool
    """When they do not answer: count locally (True) or refuse with 503 (False)."""

    @property
    def down(self) -> str | None:
        """Why they cannot be asked now (they did not answer; retried in the background), or None."""

    def state(self) -> dict[str, Any]:
        """Where they are and whether they answer, for /readyz, the admin API and `lorabox status`."""
        ...

    async def take(self, ask: Ask) -> Counted:
        """`LocalLimits.take` against every box's counters; LimitsUnavailable when they do not answer."""
        ...

    def settle(self, ask: Ask, used: int, *, bucket: bool, requests: int = 0) -> None:
        """Give back what a request reserved and did not use, and count what it used; in the
        background, never raising (what is lost while they are down is written back on recovery).
        `bucket`: the tokens go back to the shared tokens bucket (the shared counters took them)."""
