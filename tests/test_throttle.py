"""The quota's throttle (`quota_action = "throttle"`) with fake clocks: past 100% a tenant is still
served, at the throttle's rate with an exact Retry-After beyond it, at the lowest fair-share weight,
saying so in a header and in one event per period; past the hard ceiling it is refused for good.
(tests/test_service_keys.py runs it through the live server.)"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from appliance.errors import PolicyError
from appliance.telemetry.metrics import MetricsSnapshot, render
from appliance.telemetry.stats import TrafficStats
from appliance.tenancy.admission import QUOTA_STATE_HEADER, THROTTLED_WEIGHT, Admission
from appliance.tenancy.policy import Policy, parse_value
from appliance.tenancy.policybook import PolicyBook
from appliance.tenancy.quota import QuotaMeter
from appliance.tenancy.scheduler import FairScheduler
from tests.test_admission import Clocks, refusal
from tests.test_metrics import samples, status


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def throttling(clocks: Clocks, events: list[tuple[str, str]], **policy: Any) -> Admission:
    own = {"quota_action": "throttle", "quota_tokens": 1000, "throttle_rpm": 6, "throttle_tpm": 600} | policy
    quota = QuotaMeter(clock=clocks.utc, on_throttle=lambda tenant, detail: events.append((tenant, detail)))
    scheduler = FairScheduler(max_running=64, max_queued=64)
    return Admission(PolicyBook(Policy(), {"acme": own}), quota, scheduler, clock=clocks.monotonic)


def use_up(gate: Admission, tokens: int) -> None:
    """Requests that use `tokens` in all (100 at a time), admitted before the quota is reached."""
    for _ in range(tokens // 100):
        gate.admit("acme", 50, 50).finish(50, 50)


async def test_past_the_quota_a_tenant_is_served_at_the_throttle_rate(clocks: Clocks) -> None:
    events: list[tuple[str, str]] = []
    gate = throttling(clocks, events)
    use_up(gate, 1000)
    assert gate.quota_view("acme")["state"] == "throttled"
    tickets = [gate.admit("acme", 10, 10) for _ in range(6)]  # the throttle's burst: 6 requests
    assert all(t.headers[QUOTA_STATE_HEADER] == "throttled" for t in tickets)
    assert tickets[-1].headers["x-ratelimit-limit-requests"] == "6"
    beyond = refusal(gate.admit, "acme", 10, 10)
    assert (beyond.status, beyond.code, beyond.should_retry) == (429, "rate_limit_exceeded", True)
    assert beyond.retry_after_s == pytest.approx(10.0)  # one request back every 60 / 6 s
    assert beyond.headers[QUOTA_STATE_HEADER] == "throttled"
    assert refusal(gate.check_requests, "acme").retry_after_s == pytest.approx(10.0)  # before the body
    clocks.seconds += 9.9
    assert refusal(gate.admit, "acme", 10, 10).retry_after_s == pytest.approx(0.1)
    clocks.seconds += 0.1
    gate.admit("acme", 10, 10)
    assert events == [("acme", "1000 of 1000 tokens this month: throttled")]  # one event, not seven
    assert gate.throttled["acme"] == 7  # the metric: requests served throttled


async def test_throttled_tokens_per_minute_wait_exactly_too(clocks: Clocks) -> None:
    gate = throttling(clocks, [], throttle_rpm=None, quota_hard_pct=None)
    use_up(gate, 1000)
    gate.admit("acme", 100, 200)  # 300 of the 600 a minute
    gate.admit("acme", 100, 200)
    assert refusal(gate.admit, "acme", 100, 200).retry_after_s == pytest.approx(30.0)  # 300 at 10/s
    too_large = refusal(gate.admit, "acme", 100, 600)
    assert (too_large.code, too_large.should_retry) == ("rate_limit_exceeded", False)


async def test_the_request_that_crosses_the_quota_is_throttled_not_refused(clocks: Clocks) -> None:
    events: list[tuple[str, str]] = []
    gate = throttling(clocks, events)
    use_up(gate, 900)
    before = gate.admit("acme", 50, 50)  # 900 + 100: fits the quota exactly
    assert QUOTA_STATE_HEADER not in before.headers
    crossing = gate.admit("acme", 50, 50)  # 1100 with what the first reserved: past it
    assert crossing.headers[QUOTA_STATE_HEADER] == "throttled"
    assert len(events) == 1


async def test_past_the_hard_ceiling_the_quota_refuses_for_good(clocks: Clocks) -> None:
    gate = throttling(clocks, [], throttle_rpm=None, throttle_tpm=None, quota_hard_pct=150)
    use_up(gate, 1500)
    ceiling = refusal(gate.admit, "acme", 1, 1)
    assert (ceiling.status, ceiling.code, ceiling.should_retry) == (429, "insufficient_quota", False)
    assert "1500 of 1500 tokens (150% of the quota of 1000: its hard ceiling)" in ceiling.message
    assert ceiling.headers[QUOTA_STATE_HEADER] == "throttled"
    clocks.start += timedelta(days=31)  # a new month: served at full rate again
    fresh = gate.admit("acme", 1, 1)
    assert QUOTA_STATE_HEADER not in fresh.headers


async def test_a_throttled_tenant_gets_the_lowest_fair_share_weight(clocks: Clocks) -> None:
    gate = throttling(clocks, [], weight=4.0)
    gate.admit("acme", 1, 1)  # its own weight while under the quota
    assert gate.scheduler._tenants["acme"].weight == 4.0
    use_up(gate, 1000)
    gate.admit("acme", 1, 1)
    assert gate.scheduler._tenants["acme"].weight == THROTTLED_WEIGHT


async def test_reject_refuses_at_the_quota_as_before(clocks: Clocks) -> None:
    events: list[tuple[str, str]] = []
    gate = throttling(clocks, events, quota_action="reject")
    use_up(gate, 1000)
    refused = refusal(gate.admit, "acme", 1, 1)
    assert (refused.code, refused.should_retry) == ("insufficient_quota", False)
    assert QUOTA_STATE_HEADER not in refused.headers
    assert not events


@pytest.mark.parametrize(
    ("field", "value"),
    [("quota_action", "slow"), ("quota_hard_pct", "99"), ("throttle_rpm", "0"), ("throttle_tpm", "-1")],
)
def test_throttle_values_are_checked_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(PolicyError, match=field):
        parse_value(field, value)


def test_the_throttled_requests_are_a_metric_per_tenant() -> None:
    text = render(MetricsSnapshot.take(TrafficStats(), status("status_cpu.json"), [], {"acme": 7}))
    assert samples(text)[("lorabox_quota_throttled_requests_total", (("tenant", "acme"),))] == 7


async def test_the_lead_run_up_while_throttled_is_not_carried_into_the_next_period(clocks: Clocks) -> None:
    gate = throttling(clocks, [])
    use_up(gate, 1000)
    scheduler = gate.scheduler
    other = scheduler.enter("globex", weight=1.0, max_concurrent=None, max_queued=8, prompt_tokens=1)
    throttled = gate.admit("acme", 50, 50)  # served 50 + 2 x 50 at the lowest weight
    throttled.served(50)
    throttled.finish(50, 50)

    def lead() -> float:
        return scheduler._tenants["acme"].counter - scheduler._tenants["globex"].counter

    throttled_lead = lead()
    assert throttled_lead > 100 / THROTTLED_WEIGHT
    clocks.start += timedelta(days=31)  # a new month: acme's own weight again
    gate.admit("acme", 1, 1)  # its prompt charged at weight 1
    assert lead() == pytest.approx(throttled_lead * THROTTLED_WEIGHT + 1)
    scheduler.leave(other)
