"""The shared limits backend against a real redis-server: two boxes' admissions share one set of
counters (rate limits and quota, exactly), each fail mode does what it says when Redis stops, and
shared counting resumes, with each box's share written back, when it returns."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.tenancy.admission import QUOTA_STATE_HEADER, Admission, Refusal
from appliance.tenancy.limits import Ask, LimitsUnavailable
from appliance.tenancy.policy import Policy
from appliance.tenancy.policybook import PolicyBook
from appliance.tenancy.quota import QuotaMeter
from appliance.tenancy.redislimits import RedisLimits, key
from appliance.tenancy.scheduler import FairScheduler
from appliance.testing.redisserver import RedisServer

pytestmark = pytest.mark.skipif(not RedisServer.available(), reason="redis-server is not installed")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class Box:
    """One box's admission with shared counters (its own quota meter, scheduler and box id)."""

    def __init__(self, url: str, box_id: str, fail_open: bool, **policy: Any):
        self.quota = QuotaMeter()
        self.limits = RedisLimits(url, box_id, self.quota, fail_open=fail_open, probe_s=0.05)
        self.admission = Admission(
            PolicyBook(Policy(), {"acme": policy}),
            self.quota,
            FairScheduler(max_running=64, max_queued=64),
            shared=self.limits,
        )
        self._context = self.limits.running()

    async def __aenter__(self) -> Box:
        await anext(self._context)
        await until(lambda: self.limits.down is None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with pytest.raises(StopAsyncIteration):
            await anext(self._context)

    async def admit(self, prompt: int = 10, max_tokens: int = 10) -> Any:
        return await self.admission.admit_shared("acme", prompt, max_tokens)


async def until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def two_boxes(redis_server: RedisServer) -> AsyncIterator[tuple[Box, Box]]:
    async with (
        Box(redis_server.url, "box-a", True, rpm=3, tpm=1000, quota_tokens=200) as a,
        Box(redis_server.url, "box-b", False, rpm=3, tpm=1000, quota_tokens=200) as b,
    ):
        yield a, b


async def test_two_boxes_share_one_requests_bucket_with_the_exact_wait(two_boxes: tuple[Box, Box]) -> None:
    a, b = two_boxes
    await a.admit()
    await b.admit()
    await a.admit()
    with pytest.raises(Refusal) as refused:
        await b.admit()  # the fourth of an rpm of 3, on the other box: refused all the same
    assert (refused.value.status, refused.value.code) == (429, "rate_limit_exceeded")
    assert 19.0 < refused.value.retry_after_s <= 20.0  # one request refills in 60 / 3 s
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    # The next box's check before the body is read knows it too, from its last answer.
    with pytest.raises(Refusal):
        b.admission.check_requests("acme")


async def test_the_quota_holds_across_boxes_under_concurrent_takes(redis_server: RedisServer) -> None:
    async with (
        Box(redis_server.url, "box-a", True, quota_tokens=1000) as a,
        Box(redis_server.url, "box-b", True, quota_tokens=1000) as b,
    ):
        outcomes = await asyncio.gather(
            *[box.admit(50, 50) for _ in range(15) for box in (a, b)], return_exceptions=True
        )
        tickets = [o for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, Refusal)]
        assert (len(tickets), len(refused)) == (10, 20), outcomes  # 10 x 100 reserved = the quota
        assert {r.code for r in refused} == {"insufficient_quota"}
        for ticket in tickets:
            ticket.finish(50, 20)  # each used 70 of its 100
        await until(lambda: not a.limits._tasks and not b.limits._tasks)
        [month] = [k async for k in a.limits.client.scan_iter(match=key("acme", "used:month:*"))]
        used = await a.limits.client.hgetall(month)
        assert sum(int(v) for v in used.values()) == 700
        assert await a.limits.client.hgetall(key("acme", "reserved")) == {}
        # 300 left: three more requests of 100 fit, wherever they are sent, and no fourth.
        for box in (a, b, a):
            (await box.admit(50, 50)).finish(50, 50)
        with pytest.raises(Refusal):
            await b.admit(50, 50)


async def test_a_box_that_restarts_rewrites_its_share_from_its_own_ledger(redis_server: RedisServer) -> None:
    async with Box(redis_server.url, "box-a", True, quota_tokens=1000) as a:
        await a.admit(100, 100)  # reserved, and then the box dies: never settled
        assert await a.limits.client.hget(key("acme", "reserved"), "box-a") == b"200"
    restarted = Box(redis_server.url, "box-a", True, quota_tokens=1000)
    restarted.quota.settle("acme", Policy(), 0, 300)  # what its ledger booked this month
    async with restarted:
        client = restarted.limits.client
        assert await client.hget(key("acme", "reserved"), "box-a") is None
        used = [k async for k in client.scan_iter(match=key("acme", "used:month:*"))]
        assert await client.hget(used[0], "box-a") == b"300"


async def test_redis_stopped_each_fail_mode_does_what_it_says_and_counting_resumes(
    two_boxes: tuple[Box, Box], redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    opened, closed = two_boxes  # box-a fails open, box-b fails closed
    await opened.admit(50, 50)  # shared: 100 of the quota of 200 reserved
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="appliance.tenancy.redislimits")
    began = time.monotonic()
    ticket = await opened.admit(10, 10)  # counted on this box alone; it still knows of the 100
    assert time.monotonic() - began < 2.0  # bounded by the timeout, not a stall
    assert opened.limits.down is not None
    assert not ticket.shared
    with pytest.raises(Refusal) as refused:
        await opened.admit(50, 50)  # 100 + 20 + 100 > 200: the quota holds on the open box
    assert refused.value.code == "insufficient_quota"
    ticket.finish(10, 10)
    with pytest.raises(Refusal) as refused:
        await closed.admit()
    assert (refused.value.status, refused.value.code) == (503, "limits_unavailable")
    assert "did not answer" in refused.value.message
    outages = [r for r in caplog.records if "shared limits unavailable" in r.getMessage()]
    assert len(outages) == 2  # one line per box, however many requests met the outage
    assert "limits_fail_mode = open" in outages[0].getMessage() + outages[1].getMessage()

    redis_server.start()  # empty: it lost every counter
    await until(lambda: opened.limits.down is None and closed.limits.down is None)
    # Box a wrote its share back (its 20 used; its first request's 100 still reserved): so the
    # quota of 200 leaves 80 for a request of 100 on box b, which is refused, and 80 for box b's 80.
    with pytest.raises(Refusal):
        await closed.admit(50, 50)
    assert (await closed.admit(40, 40)).shared


async def test_a_take_never_waits_longer_than_the_timeout_on_an_unanswering_redis(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (a stopped process: SIGSTOP)."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        async with Box(server.url, "box-a", True, rpm=10) as box:
            assert server.process is not None
            server.process.send_signal(19)  # SIGSTOP
            began = time.monotonic()
            with pytest.raises(LimitsUnavailable):
                await box.limits.take(Ask("acme", 2, rpm=10))
            assert time.monotonic() - began < 4 * box.limits.timeout_s
            server.process.send_signal(18)  # SIGCONT
            await until(lambda: box.limits.down is None)
    finally:
        if server.process is not None:
            server.process.send_signal(18)
        server.stop()


async def test_throttle_and_its_hard_ceiling_hold_across_boxes(redis_server: RedisServer) -> None:
    policy = {"quota_tokens": 100, "quota_action": "throttle", "throttle_rpm": 2, "quota_hard_pct": 200}
    async with (
        Box(redis_server.url, "box-a", True, **policy) as a,
        Box(redis_server.url, "box-b", False, **policy) as b,
    ):
        for _ in range(5):  # box A uses the whole quota
            (await a.admit()).finish(10, 10)
        # Box B learns what A used from its first answer: that request may pass at full rate (within
        # the ceiling, which the shared counters check), the next ones are throttled.
        (await b.admit()).finish(10, 10)
        for _ in range(2):  # the throttle's burst: 2 requests
            throttled = await b.admit()
            assert throttled.headers[QUOTA_STATE_HEADER] == "throttled"
            throttled.finish(10, 10)
        with pytest.raises(Refusal) as slowed:  # the shared bucket of 2 a minute: empty
            await b.admit()
        assert slowed.value.code == "rate_limit_exceeded"
        assert 29.0 < slowed.value.retry_after_s <= 30.0
        b.admission.policies.update("acme", policy | {"throttle_rpm": None})
        for _ in range(2):  # 160 used of the ceiling of 200: two more of 20 fit, not a third
            (await b.admit()).finish(10, 10)
        with pytest.raises(Refusal) as ceiling:
            await b.admit()
        assert (ceiling.value.code, ceiling.value.should_retry) == ("insufficient_quota", False)


async def test_batch_lines_leave_the_shared_rate_limits_alone_and_take_from_the_quota(
    redis_server: RedisServer,
) -> None:
    async with Box(redis_server.url, "box-a", False, rpm=1, tpm=1000, quota_tokens=300) as a:
        await a.admit()  # the minute's only request (20 tokens)
        lines = [await a.admission.admit_shared("acme", 10, 90, tier="batch") for _ in range(2)]
        assert [ticket.shared for ticket in lines] == [True, True]
        with pytest.raises(Refusal) as limited:
            await a.admit()
        assert limited.value.code == "rate_limit_exceeded"
        assert 59.0 < limited.value.retry_after_s <= 60.0  # the bucket as the first request left it
        with pytest.raises(Refusal) as over:  # 20 + 200 reserved of 300: a third line does not fit
            await a.admission.admit_shared("acme", 10, 90, tier="batch")
        assert over.value.code == "insufficient_quota"
