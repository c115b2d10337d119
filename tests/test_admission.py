"""Admission's logic with fake clocks: exact Retry-After, token reservations settled, quotas that are
never exceeded, one warning per period, queue bounds, and policy values checked at the door.
(tests/test_qos.py runs the same rules through the live server and the openai client.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from appliance.errors import PolicyError
from appliance.tenancy.admission import QUOTA_WARNING_HEADER, Admission, Refusal, Ticket
from appliance.tenancy.limits import Ask, LocalLimits
from appliance.tenancy.policy import Policy, parse_value
from appliance.tenancy.policybook import PolicyBook
from appliance.tenancy.quota import QuotaMeter, period_start
from appliance.tenancy.ratelimit import duration
from appliance.tenancy.scheduler import FairScheduler


class Clocks:
    """One fake time for the rate limits (monotonic seconds) and the quota periods (UTC)."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.start = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def utc(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds - 1000.0)


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


def admission(clocks: Clocks, warnings: list[tuple[str, str]] | None = None, **policy: Any) -> Admission:
    book = PolicyBook(Policy(), {"acme": policy})

    def warn(tenant: str, detail: str) -> None:
        if warnings is not None:
            warnings.append((tenant, detail))

    quota = QuotaMeter(clock=clocks.utc, on_warning=warn)
    return Admission(book, quota, FairScheduler(max_running=64, max_queued=64), clock=clocks.monotonic)


def refusal(admit: Any, *args: Any) -> Refusal:
    with pytest.raises(Refusal) as refused:
        admit(*args)
    return refused.value


async def test_rpm_refuses_the_fourth_with_the_exact_wait_and_passes_after_it(clocks: Clocks) -> None:
    gate = admission(clocks, rpm=3)
    tickets = [gate.admit("acme", 10, 10) for _ in range(3)]
    assert tickets[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert tickets[-1].headers["x-ratelimit-reset-requests"] == "1m0s"
    fourth = refusal(gate.admit, "acme", 10, 10)
    assert (fourth.status, fourth.code) == (429, "rate_limit_exceeded")
    assert fourth.retry_after_s == pytest.approx(20.0)  # one request back every 60 / 3 s
    clocks.seconds += 19.5
    assert refusal(gate.admit, "acme", 10, 10).retry_after_s == pytest.approx(0.5)
    assert refusal(gate.check_requests, "acme").retry_after_s == pytest.approx(0.5)  # before the body
    clocks.seconds += 0.5
    gate.admit("acme", 10, 10)


async def test_tpm_reserves_prompt_plus_max_tokens_and_gives_back_what_was_not_used(clocks: Clocks) -> None:
    gate = admission(clocks, tpm=120)
    first = gate.admit("acme", 10, 50)  # reserves 60
    gate.admit("acme", 10, 50)
    assert refusal(gate.admit, "acme", 10, 50).retry_after_s == pytest.approx(30.0)  # 60 at 2/s
    first.finish(10, 5)  # used 15 of its 60: 45 go back
    assert refusal(gate.admit, "acme", 10, 50).retry_after_s == pytest.approx(7.5)  # 15 more at 2/s
    clocks.seconds += 7.5
    gate.admit("acme", 10, 50)


async def test_a_request_larger_than_the_tpm_is_refused_for_good(clocks: Clocks) -> None:
    refused = refusal(admission(clocks, tpm=100).admit, "acme", 10, 200)
    assert (refused.status, refused.code, refused.should_retry) == (429, "rate_limit_exceeded", False)
    assert refused.retry_after_s is None
    assert "max_tokens" in refused.message


async def test_quota_is_never_exceeded_by_requests_admitted_together(clocks: Clocks) -> None:
    gate = admission(clocks, quota_tokens=1000)
    admitted: list[Ticket] = []
    refused: list[Refusal] = []
    for _ in range(20):  # twenty at once, each could use 10 + 90
        try:
            admitted.append(gate.admit("acme", 10, 90))
        except Refusal as refusal:
            refused.append(refusal)
    assert len(admitted) == 10
    assert {(r.status, r.code, r.should_retry) for r in refused} == {(429, "insufficient_quota", False)}
    for ticket in admitted:
        ticket.finish(10, 90)  # each used all it reserved
    assert gate.quota_view("acme")["used_tokens"] == 1000  # not one token over
    clocks.start += timedelta(days=31)  # the next month
    gate.admit("acme", 10, 90)


async def test_the_soft_threshold_warns_in_every_response_and_once_per_period(clocks: Clocks) -> None:
    warnings: list[tuple[str, str]] = []
    gate = admission(clocks, warnings, quota_tokens=1000, quota_warn_pct=50)
    headers = []
    for _ in range(8):
        ticket = gate.admit("acme", 50, 50)
        headers.append(ticket.headers.get(QUOTA_WARNING_HEADER))
        ticket.finish(50, 50)
    assert headers[:5] == [None] * 5  # 0 to 400 used
    assert all(h and "monthly quota of 1000 tokens" in h for h in headers[5:])  # 500 and on
    assert warnings == [("acme", "50% of 1000 tokens this month")]  # the 5th crossed it: once
    clocks.start += timedelta(days=31)
    for _ in range(6):
        gate.admit("acme", 50, 50).finish(50, 50)
    assert len(warnings) == 2  # once more in the new period


async def test_quota_use_is_seeded_from_the_ledger_for_every_period(clocks: Clocks) -> None:
    meter = QuotaMeter(clock=clocks.utc)
    now = clocks.utc()
    starts = {p: period_start(p, now).isoformat(timespec="milliseconds") for p in ("day", "week", "month")}
    booked = {starts["month"]: {"acme": 900}, starts["week"]: {"acme": 300}, starts["day"]: {"acme": 100}}
    meter.seed(lambda since: booked[since], {})
    assert [meter.used("acme", p) for p in ("day", "week", "month")] == [100, 300, 900]
    counters = LocalLimits(meter, clocks.monotonic)
    assert not counters.take(Ask("acme", 101, quota_tokens=1000)).quota_fits
    assert counters.take(Ask("acme", 101, quota_tokens=1000, quota_period="week")).quota_fits


async def test_queue_full_is_429_for_the_tenant_and_503_for_the_box(clocks: Clocks) -> None:
    gate = admission(clocks, max_concurrent=1, max_queued=1)
    gate.admit("acme", 1, 1)
    gate.admit("acme", 1, 1)
    tenant_full = refusal(gate.admit, "acme", 1, 1)
    assert (tenant_full.status, tenant_full.code) == (429, "rate_limit_exceeded")
    assert tenant_full.retry_after_s is not None
    gate.scheduler.max_queued = 1
    gate.policies.update("globex", {"max_concurrent": 1})
    gate.admit("globex", 1, 1)
    box_full = refusal(gate.admit, "globex", 1, 1)
    assert (box_full.status, box_full.code) == (503, "server_overloaded")


async def test_a_policy_update_applies_to_the_next_request(clocks: Clocks) -> None:
    gate = admission(clocks)
    gate.admit("acme", 1, 1)
    gate.policies.update("acme", {"rpm": 1})
    gate.admit("acme", 1, 1)
    assert refusal(gate.admit, "acme", 1, 1).status == 429


def test_duration_reads_like_openais() -> None:
    assert [duration(s) for s in (0.0, 0.1204, 1, 20, 60, 392.5)] == [
        "0ms",
        "121ms",
        "1s",
        "20s",
        "1m0s",
        "6m32.5s",
    ]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rpm", -1),
        ("rpm", 0),
        ("rpm", 10**12),
        ("rpm", "sixty"),
        ("rpm", True),
        ("tpm", 1.5),
        ("weight", float("nan")),
        ("weight", float("inf")),
        ("weight", 0),
        ("max_queued", None),
        ("quota_period", "year"),
        ("price_in", -1),
        ("system_prompt", 42),
        ("system_prompt", "x" * (1 << 20)),
        ("system_prompt", "\ud800"),
        ("colour", "red"),
    ],
)
def test_hostile_values_are_refused_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_value(field, value)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"{field}: ")


async def test_tenant_load_tells_telemetry_the_queue_the_policy_and_the_quota(clocks: Clocks) -> None:
    gate = Admission(
        PolicyBook(Policy(), {"acme": {"quota_tokens": 1000, "weight": 2.0}}),
        QuotaMeter(clock=clocks.utc),
        FairScheduler(max_running=1, max_queued=64),
        clock=clocks.monotonic,
    )
    running, waiting = gate.admit("acme", 10, 90), gate.admit("acme", 10, 90)
    load = gate.tenant_load("acme")
    assert (load["running"], load["queued"]) == (1, 1)
    assert (load["policy"]["weight"], load["policy"]["system_prompt"]) == (2.0, False)
    assert (load["quota"]["limit_tokens"], load["quota"]["used_tokens"]) == (1000, 0)
    running.finish(10, 40)
    waiting.finish(10, 40)
    load = gate.tenant_load("acme")
    assert (load["running"], load["queued"], load["quota"]["used_tokens"]) == (0, 0, 100)
    assert gate.tenant_load("nobody")["running"] == 0


async def test_batch_lines_meet_no_rate_limit_but_count_towards_the_quota(clocks: Clocks) -> None:
    gate = admission(clocks, rpm=1, tpm=100, quota_tokens=500)
    gate.admit("acme", 10, 50)  # the minute's only request, 60 of its 100 tokens
    assert refusal(gate.admit, "acme", 10, 10).code == "rate_limit_exceeded"
    lines = [gate.admit("acme", 10, 90, tier="batch") for _ in range(4)]  # 100 each: over the tpm too
    assert all(ticket.background for ticket in lines)
    # The interactive buckets are as the batch found them: still empty, still refilling at 1/60 s.
    refused = refusal(gate.admit, "acme", 10, 10)
    assert (refused.code, refused.retry_after_s) == ("rate_limit_exceeded", pytest.approx(60.0))
    # The quota counts everyone: 60 + 400 reserved of 500, so a fifth line (100) does not fit.
    assert refusal(gate.admit, "acme", 10, 90, "", None, "batch").code == "insufficient_quota"
    # flex is interactive traffic in the background band: rate limited.
    assert refusal(gate.admit, "acme", 1, 1, "", None, "flex").code == "rate_limit_exceeded"
