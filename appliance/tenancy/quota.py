"""Token quotas per period (UTC day, week or month), kept in memory and seeded from the ledger.

Each tenant's use is counted for all three periods at once, so a change of `quota_period`
applies at the next request without a query. A request reserves prompt + max_tokens when it is
admitted; one whose reservation, with what is used and what others have reserved, would cross the
quota is refused before it runs, so the quota is never exceeded. At the end the reservation is
settled to what the request used, the tokens its ledger row books.

With a shared limits backend (redislimits.py) this meter is the mirror of this box's own share:
its use is exactly this box's ledger, and what the other boxes used is kept as they last reported
it (`set_elsewhere`), for when the shared counters cannot be asked.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .policy import QUOTA_PERIODS, Policy

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
ADJECTIVES = {"day": "daily", "week": "weekly", "month": "monthly"}


def _utc_now() -> datetime:
    return datetime.now(UTC)


def period_start(period: str, now: datetime) -> datetime:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def timestamp(moment: datetime) -> str:
    """As the ledger writes `ts` (so that strings compare as times)."""
    return moment.isoformat(timespec="milliseconds")


@dataclass
class _Use:
    start: datetime
    tokens: int = 0


def warning(policy: Policy, used: int) -> str | None:
    """The warning header's text once `used` is past the soft threshold; None before (or without
    a quota)."""
    limit = policy.quota_tokens
    if limit is None or used < limit * policy.quota_warn_pct / 100:
        return None
    return f"{used / limit:.0%} of the {ADJECTIVES[policy.quota_period]} quota of {limit} tokens used"


class QuotaMeter:
    def __init__(
        self,
        clock: Clock = _utc_now,
        on_warning: Callable[[str, str], None] | None = None,
        on_throttle: Callable[[str, str], None] | None = None,
    ):
        self._clock = clock
        self._use: dict[tuple[str, str], _Use] = {}
        self._reserved: defaultdict[str, int] = defaultdict(int)
        self._elsewhere: dict[tuple[str, str], _Use] = {}
        self._warned: dict[str, datetime] = {}  # tenant → when it was last warned
        self._throttled: dict[str, datetime] = {}  # tenant → when it was last told it is throttled
        self.on_warning = on_warning
        self.on_throttle = on_throttle

    def seed(
        self,
        tokens_since: Callable[[str], dict[str, int]],
        warned: dict[str, str],
        throttled: dict[str, str] | None = None,
    ) -> None:
        """Start from the ledger: tokens per tenant since each period's start, and when each tenant
        last got a quota warning, or was first throttled (one of each per period, across restarts)."""
        now = self._clock()
        for period in QUOTA_PERIODS:
            start = period_start(period, now)
            for tenant, tokens in tokens_since(timestamp(start)).items():
                self._use[(tenant, period)] = _Use(start, tokens)
        for tenant, ts in warned.items():
            self._warned[tenant] = datetime.fromisoformat(ts)
        for tenant, ts in (throttled or {}).items():
            self._throttled[tenant] = datetime.fromisoformat(ts)

    def note_throttled(self, tenant: str, policy: Policy) -> None:
        """A request of the tenant was admitted throttled: the first one in a period is told (the log,
        and an event through `on_throttle`)."""
        last = self._throttled.get(tenant)
        if last is not None and last >= self._current(tenant, policy.quota_period).start:
            return
        self._throttled[tenant] = self._clock()
        used = self.used(tenant, policy.quota_period)
        detail = f"{used} of {policy.quota_tokens} tokens this {policy.quota_period}: throttled"
        log.warning("tenant %s is past its quota (%s)", tenant, detail)
        if self.on_throttle is not None:
            self.on_throttle(tenant, detail)

    def _current(self, tenant: str, period: str) -> _Use:
        start = period_start(period, self._clock())
        use = self._use.get((tenant, period))
        if use is None or use.start != start:  # a new period began
            use = self._use[(tenant, period)] = _Use(start)
        return use

    def own(self, tenant: str, period: str) -> int:
        """Tokens this box's requests used this period (its ledger's count)."""
        return self._current(tenant, period).tokens

    def used(self, tenant: str, period: str) -> int:
        """Tokens used this period: this box's, and what other boxes had used when last heard of."""
        use = self._current(tenant, period)
        other = self._elsewhere.get((tenant, period))
        return use.tokens + (other.tokens if other is not None and other.start == use.start else 0)

    def set_elsewhere(self, tenant: str, period: str, tokens: int) -> None:
        """What other boxes have used this period, as the shared counters last said (kept for when
        they cannot be asked: limits_fail_mode = "open")."""
        self._elsewhere[(tenant, period)] = _Use(self._current(tenant, period).start, max(0, tokens))

    def forget(self, tenant: str) -> None:
        """A removed tenant's use: gone, so that a tenant given its name later starts at zero."""
        for table in (self._use, self._elsewhere):
            for key in [k for k in table if k[0] == tenant]:
                del table[key]
        self._warned.pop(tenant, None)

    def reserved(self, tenant: str) -> int:
        return self._reserved.get(tenant, 0)

    def usage(self) -> list[tuple[str, str, datetime, int]]:
        """This box's own use in every current period: (tenant, period, period start, tokens)."""
        return [
            (tenant, period, self._current(tenant, period).start, self._current(tenant, period).tokens)
            for tenant, period in list(self._use)
        ]

    def reservations(self) -> dict[str, int]:
        return dict(self._reserved)

    def reserve(self, tenant: str, tokens: int) -> None:
        self._reserved[tenant] += tokens

    def settle(self, tenant: str, policy: Policy, reserved: int, used: int) -> None:
        """A request ended: its reservation goes, the tokens it used count."""
        self._reserved[tenant] -= reserved
        if self._reserved[tenant] <= 0:
            del self._reserved[tenant]
        for period in QUOTA_PERIODS:
            self._current(tenant, period).tokens += used
        self._maybe_warn(tenant, policy)

    def _maybe_warn(self, tenant: str, policy: Policy) -> None:
        limit = policy.quota_tokens
        if limit is None:
            return
        use = self._current(tenant, policy.quota_period)
        used = self.used(tenant, policy.quota_period)
        last = self._warned.get(tenant)
        if used < limit * policy.quota_warn_pct / 100 or (last is not None and last >= use.start):
            return
        self._warned[tenant] = self._clock()
        detail = f"{used / limit:.0%} of {limit} tokens this {policy.quota_period}"
        log.warning("tenant %s passed %g%% of its quota: %s", tenant, policy.quota_warn_pct, detail)
        if self.on_warning is not None:
            self.on_warning(tenant, detail)

    def view(self, tenant: str, policy: Policy) -> dict[str, Any]:
        """The admin API's `quota` object."""
        use = self._current(tenant, policy.quota_period)
        used = self.used(tenant, policy.quota_period)
        limit = policy.quota_tokens
        return {
            "used_tokens": used,
            "limit_tokens": limit,
            "used_pct": round(100 * used / limit, 1) if limit else None,
            "period": policy.quota_period,
            "period_start": use.start.isoformat(),
            "reserved_tokens": self._reserved.get(tenant, 0),
        }
