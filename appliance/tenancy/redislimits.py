"""Admission's counters in Redis, shared by every box (`limits_backend = "redis://..."`).

The algorithm is the local one (limits.py): a token bucket per tenant and kind, refilled by
`limit / 60` a second, and a quota reserved at admission and settled to what the request used. It
runs inside Redis, one Lua script per take: both buckets and the quota are checked and taken all
or nothing, atomically, with Redis's own clock (`TIME`), so every box sees one bucket and no skew
between the boxes' clocks enters. Keys, per tenant (one hash tag, so a tenant's keys share a slot):

    lorabox:{acme}:rpm, lorabox:{acme}:tpm      hash l (level), t (Redis time of l); expire idle
    lorabox:{acme}:reserved                     hash <box id> -> tokens its requests hold now
    lorabox:{acme}:used:<period>:<start>        hash <box id> -> tokens its requests used this period

Each box owns its fields of the quota hashes, and its local quota meter (seeded from its own
ledger, and settled with every request) mirrors them exactly: whenever the two may have parted
(at start, and when Redis answers again after failing) the box writes its fields back from its
mirror. So nothing is counted twice, and a Redis that lost its data (restarted without
persistence) gets every running box's share back from that box's ledger.

Error bound, against one box counting alone:
- Redis answering: exact. A request admitted anywhere is counted everywhere before the next take.
- A take whose answer is lost (Redis ran it, the reply timed out): counted, not used. The tokens
  come back as the bucket refills (at most 60 s); the quota reservation when the box writes its
  fields back, which it does before it asks Redis again. Both err against the tenant, never for it.
- Redis unreachable, `limits_fail_mode = "open"`: each box counts alone (rate limits up to N x the
  limit with N boxes, for as long as it lasts); the quota counts what the other boxes had used
  when last heard of, so it is exceeded by at most what the other boxes serve meanwhile.
  `"closed"`: requests get 503 instead, nothing is exceeded.
- Redis restarted empty: the buckets start full (one more burst); the quota use is back as soon
  as each box has written its fields (within PROBE_S of Redis answering again); a box that is not
  running has its share back when it starts.

Every call has a timeout of TIMEOUT_S; past it (or on any error) the counters are `down`: the
log says so once, requests use the fail mode without asking Redis, and a probe every PROBE_S
finds it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from .limits import Ask, Counted, Levels, LimitsUnavailable
from .policy import QUOTA_PERIODS
from .quota import QuotaMeter, period_start

log = logging.getLogger(__name__)

TIMEOUT_S = 0.25
"""The longest a request waits for Redis (connecting included) before the fail mode applies."""
PROBE_S = 1.0
"""While Redis does not answer, how often it is asked again."""
POOL_SIZE = 64
PREFIX = "lorabox"
BUCKET_TTL_S = 120  # a bucket untouched for 60 s is full: its key may go

# Shared by both scripts: a bucket's level now, refilled since it was last written.
_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function level(key, limit)
  if limit <= 0 then return -1 end
  local v = redis.call('HMGET', key, 'l', 't')
  local l, s = tonumber(v[1]), tonumber(v[2])
  if l == nil or s == nil then return limit end
  if now > s then l = l + (now - s) * limit / 60 end
  if l > limit then l = limit end
  return l
end
local function put(key, l)
  redis.call('HSET', key, 'l', string.format('%.17g', l), 't', string.format('%.17g', now))
  redis.call('EXPIRE', key, ARGV[1])
end
local function total(key)
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', key)) do sum = sum + tonumber(v) end
  return sum
end
"""

# KEYS: rpm bucket, tpm bucket, reserved, used (the quota's period). ARGV: bucket ttl, rpm, tpm
# (0: none), tokens, quota (-1: none), box. Returns taken, the two waits (-1: never), the two
# levels (-1: no such limit), quota used, quota reserved.
TAKE = (
    _LEVEL
    + """
local rpm, tpm, tokens, quota = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local function wait(l, limit, amount)
  if limit <= 0 or l >= amount then return 0 end
  if amount > limit then return -1 end
  return (amount - l) * 60 / limit
end
local lr, lt = level(KEYS[1], rpm), level(KEYS[2], tpm)
local wr, wt = wait(lr, rpm, 1), wait(lt, tpm, tokens)
local used, reserved = total(KEYS[4]), total(KEYS[3])
local fits = quota < 0 or used + reserved + tokens <= quota
local taken = 0
if wr == 0 and wt == 0 and fits then
  taken = 1
  if rpm > 0 then lr = lr - 1; put(KEYS[1], lr) end
  if tpm > 0 then lt = lt - tokens; put(KEYS[2], lt) end
  redis.call('HINCRBY', KEYS[3], ARGV[6], tokens)
  reserved = reserved + tokens
end
return {taken, tostring(wr), tostring(wt), tostring(lr), tostring(lt), tostring(used), tostring(reserved),
        fits and 1 or 0}
"""
)

# KEYS: rpm bucket, tpm bucket, reserved, used for each period (QUOTA_PERIODS). ARGV: bucket ttl,
# rpm, tpm, requests and tokens back to the buckets, reserved, used, box, each used key's ttl.
SETTLE = (
    _LEVEL
    + """
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local requests, tokens = tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm > 0 and requests > 0 then put(KEYS[1], math.min(rpm, level(KEYS[1], rpm) + requests)) end
if tpm > 0 and tokens > 0 then put(KEYS[2], math.min(tpm, level(KEYS[2], tpm) + tokens)) end
if redis.call('HINCRBY', KEYS[3], ARGV[8], -tonumber(ARGV[6])) <= 0 then
  redis.call('HDEL', KEYS[3], ARGV[8])
end
local used = tonumber(ARGV[7])
if used > 0 then
  for i = 4, #KEYS do
    redis.call('HINCRBY', KEYS[i], ARGV[8], used)
    redis.call('EXPIRE', KEYS[i], ARGV[5 + i])
  end
end
return 1
"""
)


def key(tenant: str, what: str) -> str:
    return f"{PREFIX}:{{{tenant}}}:{what}"


def used_key(tenant: str, period: str, start: datetime) -> str:
    return key(tenant, f"used:{period}:{start.date().isoformat()}")


def _period_end(period: str, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def used_ttl_s(period: str, start: datetime, now: datetime) -> int:
    """A period's use is kept until a day after the period ends (then nobody asks for it)."""
    return max(1, int((_period_end(period, start) - now).total_seconds()) + 86_400)


def shown(url: str) -> str:
    """The URL without its password, for the log and the status."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else "***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def connect(url: str, timeout_s: float = TIMEOUT_S) -> Any:
    """An asyncio Redis client whose every call gives up after `timeout_s`, and never retries (a
    script retried after a timeout could take twice). Its pool waits (up to the timeout) for a free
    connection rather than failing under a burst."""
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    return redis.Redis(connection_pool=pool)


def _number(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class RedisLimits:
    """The shared counters (limits.SharedLimits). Start it with `running()` (a cleanup context)."""

    def __init__(
        self,
        url: str,
        box_id: str,
        quota: QuotaMeter,
        *,
        fail_open: bool,
        timeout_s: float = TIMEOUT_S,
        probe_s: float = PROBE_S,
        clock: Any = time.monotonic,
    ):
        self.url, self.box_id, self.quota = url, box_id, quota
        self.fail_open = fail_open
        self.timeout_s, self.probe_s = timeout_s, probe_s
        self._clock = clock
        self.client = connect(url, timeout_s)
        self._take = self.client.register_script(TAKE)
        self._settle = self.client.register_script(SETTLE)
        self._down: str | None = "not connected to Redis yet"
        self._down_since = time.monotonic()
        self._outstanding = 0  # calls in flight: the fields are written back only when none is
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recovery: asyncio.Task[None] | None = None
        self._reported = False  # whether this outage (or the failure to connect at start) was logged
        self.outages = 0

    @property
    def down(self) -> str | None:
        return self._down

    def state(self) -> dict[str, Any]:
        """For /readyz, the admin API's status and `lorabox status`."""
        return {
            "backend": "redis",
            "url": shown(self.url),
            "box_id": self.box_id,
            "fail_mode": "open" if self.fail_open else "closed",
            "shared": self._down is None,
            "down": self._down,
            "down_s": round(time.monotonic() - self._down_since, 1) if self._down else None,
            "outages": self.outages,
        }

    # -- the request path -----------------------------------------------------------------------

    async def take(self, ask: Ask) -> Counted:
        if self._down is not None:
            raise LimitsUnavailable(self._down)
        start = period_start(ask.quota_period, datetime.now(UTC))
        keys = [
            key(ask.tenant, "rpm"),
            key(ask.tenant, "tpm"),
            key(ask.tenant, "reserved"),
            used_key(ask.tenant, ask.quota_period, start),
        ]
        args = [
            BUCKET_TTL_S,
            ask.rpm or 0,
            ask.tpm or 0,
            ask.tokens,
            -1 if ask.quota_tokens is None else ask.quota_tokens,
            self.box_id,
        ]
        answer = await self._call(self._take(keys, args))
        taken, wr, wt, lr, lt, used, reserved, fits = (_number(v) for v in answer)
        waits = {"requests": wr, "tokens": wt}
        waits = {kind: (float("inf") if wait < 0 else wait) for kind, wait in waits.items()}
        levels = Levels(lr if ask.rpm else None, lt if ask.tpm else None, ask.rpm, ask.tpm, self._clock())
        return Counted(bool(taken), waits, bool(fits), int(used), int(reserved), levels)

    def settle(self, ask: Ask, used: int, *, bucket: bool, requests: int = 0) -> None:
        if self._down is not None:
            return  # the box's fields are written back from its mirror when Redis answers again
        now = datetime.now(UTC)
        starts = {period: period_start(period, now) for period in QUOTA_PERIODS}
        keys = [key(ask.tenant, "rpm"), key(ask.tenant, "tpm"), key(ask.tenant, "reserved")]
        keys += [used_key(ask.tenant, period, start) for period, start in starts.items()]
        args: list[Any] = [
            BUCKET_TTL_S,
            ask.rpm or 0,
            ask.tpm or 0,
            requests if bucket else 0,
            max(0, ask.tokens - used) if bucket else 0,
            ask.tokens,
            used,
            self.box_id,
        ]
        args += [used_ttl_s(period, start, now) for period, start in starts.items()]
        self._background(self._call(self._settle(keys, args)))

    def _background(self, call: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(LimitsUnavailable):
                await call

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, call: Any) -> Any:
        """One Redis call, bounded; any failure makes the counters `down` (LimitsUnavailable)."""
        self._outstanding += 1
        self._quiet.clear()
        try:
            async with asyncio.timeout(self.timeout_s * 2):  # a connection's wait, then its reply
                return await call
        except Exception as exc:  # RedisError, TimeoutError, OSError: all mean "no answer"
            self._fail(exc)
            raise LimitsUnavailable(self._down or str(exc)) from exc
        finally:
            self._outstanding -= 1
            if not self._outstanding:
                self._quiet.set()

    def _fail(self, exc: BaseException) -> None:
        if self._down is not None:
            return
        self._down, self._down_since = self._reason(exc), time.monotonic()
        self._reported = False
        self._report()
        self._start_recovery()

    def _reason(self, exc: BaseException) -> str:
        return f"Redis at {shown(self.url)} did not answer ({type(exc).__name__}: {exc or 'timeout'})"

    def _report(self) -> None:
        """One log line per outage: what, what this box does meanwhile, and the fix."""
        if self._reported:
            return
        self._reported = True
        self.outages += 1
        action = (
            "counting rate limits and quotas on this box alone (limits_fail_mode = open)"
            if self.fail_open
            else "refusing requests with 503 (limits_fail_mode = closed)"
        )
        log.warning(
            "shared limits unavailable: %s; %s until it answers (asked again every %g s). "
            "Fix: start Redis, or correct limits_backend",
            self._down,
            action,
            self.probe_s,
        )

    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover())

    # -- coming back ------------------------------------------------------------------------------

    async def _recover(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    await self.client.ping()
                await self._quiet.wait()  # what was sent before must not land after the write-back
                await self._write_back()
            except Exception as exc:  # still no answer: ask again later
                self._down = self._reason(exc)
                self._report()
                await asyncio.sleep(self.probe_s)
                continue
            if self._reported:
                log.warning(
                    "shared limits back: Redis at %s answers again after %.1f s; this box's share rewritten",
                    shown(self.url),
                    time.monotonic() - self._down_since,
                )
            else:
                log.info("shared limits: Redis at %s, box %s", shown(self.url), self.box_id)
            self._down, self._reported = None, False
            return

    async def _write_back(self) -> None:
        """This box's fields of every tenant's quota hashes, from its mirror: its use this period
        (its ledger) and its reservations now. Fields of tenants it holds nothing for go."""
        now = datetime.now(UTC)
        reservations = self.quota.reservations()
        async with asyncio.timeout(max(5.0, self.timeout_s * 20)):
            pipe = self.client.pipeline(transaction=False)
            for tenant, period, start, tokens in self.quota.usage():
                name = used_key(tenant, period, start)
                pipe.hset(name, self.box_id, tokens)
                pipe.expire(name, used_ttl_s(period, start, now))
            for tenant, tokens in reservations.items():
                pipe.hset(key(tenant, "reserved"), self.box_id, tokens)
            async for name in self.client.scan_iter(match=f"{PREFIX}:*:reserved", count=1000):
                tenant = (
                    (name.decode() if isinstance(name, bytes) else name).split("{", 1)[1].split("}", 1)[0]
                )
                if tenant not in reservations:
                    pipe.hdel(name, self.box_id)
            await pipe.execute()

    async def running(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: connect (in the background: a Redis that does not answer yet
        is an outage like any other), serve, then close."""
        self._start_recovery()
        yield
        for task in [self._recovery, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._recovery, *self._tasks] if t], return_exceptions=True)
        await self.client.aclose()
