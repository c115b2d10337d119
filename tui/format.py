"""How values read: N/A for what the daemon could not say, short units everywhere."""

from __future__ import annotations

NA = "N/A"
GIB = 1 << 30
MIB = 1 << 20


def size(n: float | None) -> str:
    if n is None:
        return NA
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    if abs(n) >= MIB:
        return f"{n / MIB:.0f} MiB"
    return f"{n / 1024:.0f} KiB" if abs(n) >= 1024 else f"{n:.0f} B"


def count(n: float | None) -> str:
    if n is None:
        return NA
    if abs(n) >= 10_000_000:
        return f"{n / 1_000_000:.0f}M"
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    return f"{n:,.0f}"


def rate(n: float | None) -> str:
    if n is None:
        return NA
    return f"{n:.0f}" if abs(n) >= 100 else f"{n:.1f}"


def ms(n: float | None) -> str:
    if n is None:
        return NA
    return f"{n / 1000:.2f} s" if n >= 10_000 else f"{n:.0f} ms"


def pct(n: float | None) -> str:
    return NA if n is None else f"{n:.0f}%"


def unit(n: float | None, suffix: str, digits: int = 0) -> str:
    return NA if n is None else f"{n:.{digits}f}{suffix}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return NA
    s = int(max(seconds, 0))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {s:02d}s" if minutes else f"{s}s"


def clock(ts: str | None) -> str:
    """The time of day of an ISO 8601 timestamp (UTC, as the daemon sends it)."""
    if not ts or "T" not in ts:
        return "--:--:--"
    return ts.partition("T")[2][:8]


def text(value: object) -> str:
    return NA if value is None or value == "" else str(value)
