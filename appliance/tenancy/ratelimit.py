"""Requests and tokens per minute: one bucket per tenant and kind, refilled continuously.

A bucket holds at most `limit` units and gains `limit / 60` every second, so a tenant can send a
burst of `limit` and then `limit` a minute. The wait it reports is exact: the time until the
bucket holds what this request needs, not the rest of a fixed window. Token reservations that
turn out too large are given back when the request ends (`give_back`); that can only shorten
a wait already told to someone.
"""

from __future__ import annotations

import math


class Bucket:
    def __init__(self, limit: int, now: float):
        self.limit = limit
        self._level = float(limit)
        self._stamp = now

    @property
    def per_second(self) -> float:
        return self.limit / 60.0

    def level(self, now: float) -> float:
        if now > self._stamp:
            self._level = min(self.limit, self._level + (now - self._stamp) * self.per_second)
            self._stamp = now
        return self._level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` is there; infinite when it never can be (more than the limit)."""
        if amount > self.limit:
            return math.inf
        return max(0.0, (amount - self.level(now)) / self.per_second)

    def take(self, amount: float, now: float) -> None:
        self._level = self.level(now) - amount

    def give_back(self, amount: float, now: float) -> None:
        self._level = min(self.limit, self.level(now) + amount)

    def remaining(self, now: float) -> int:
        return max(0, math.floor(self.level(now)))

    def full_in_s(self, now: float) -> float:
        """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
        return max(0.0, (self.limit - self.level(now)) / self.per_second)

    def resize(self, limit: int, now: float) -> None:
        """A new limit: what is in the bucket stays (up to the new limit); no burst is granted."""
        self._level = min(limit, self.level(now))
        self.limit = limit


def duration(seconds: float) -> str:
    """As OpenAI writes its reset headers: `120ms`, `20s`, `1m0s`, `6m32.5s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
