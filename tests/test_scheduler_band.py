"""The fair queue's background band (batch lines): only in what interactive requests leave, at
most `max_background` places, never delaying an interactive start; fair within the band."""

from __future__ import annotations

from collections import Counter

from appliance.tenancy.scheduler import FairScheduler, TenantLoad, Turn


def enter(scheduler: FairScheduler, tenant: str, background: bool = False, weight: float = 1.0) -> Turn:
    return scheduler.enter(
        tenant,
        weight=weight,
        max_concurrent=None,
        max_queued=10_000,
        prompt_tokens=8,
        max_tokens=16,
        background=background,
    )


async def test_background_fills_only_the_band_and_idle_places() -> None:
    scheduler = FairScheduler(max_running=8, max_queued=100)
    lines = [enter(scheduler, "acme", background=True) for _ in range(20)]
    started = [t for t in lines if t.granted.done()]
    assert len(started) == 4  # half of max_running, by default
    assert scheduler.background_running == 4
    assert scheduler.background_queued == 16
    assert scheduler.running == 0

    # Interactive requests start at once, as with no batch running: the band does not count.
    chats = [enter(scheduler, "globex") for _ in range(8)]
    assert all(t.granted.done() for t in chats)
    # A batch line that ends leaves its place to no other batch line while interactive ones run
    # in all places: none starts.
    scheduler.leave(started[0])
    assert scheduler.background_running == 3
    # One more interactive request waits (max_running reached): the band stays shut while it does.
    waiting = enter(scheduler, "globex")
    assert not waiting.granted.done()
    scheduler.leave(started[1])
    assert scheduler.background_running == 2
    assert not waiting.granted.done()
    scheduler.leave(chats[0])
    assert waiting.granted.done()  # the place went to the interactive request, not a batch line
    assert scheduler.background_running == 2
    # Interactive load falls: batch lines take the places it leaves, up to the band's size.
    for turn in [*chats[1:], waiting]:
        scheduler.leave(turn)
    assert scheduler.running == 0
    assert scheduler.background_running == 4


async def test_band_size_is_the_knob_and_never_more_than_idle() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=100, max_background=3)
    chats = [enter(scheduler, "globex") for _ in range(2)]
    lines = [enter(scheduler, "acme", background=True) for _ in range(5)]
    # 2 interactive running: the band may take 2 of the 4 places, though its size is 3.
    assert sum(t.granted.done() for t in lines) == 2
    scheduler.leave(chats[0])
    assert sum(t.granted.done() for t in lines) == 3
    scheduler.leave(chats[1])
    assert sum(t.granted.done() for t in lines) == 3  # the band's size


async def test_tenants_share_the_band_fairly() -> None:
    """Two tenants' batches, one of weight 2: the band's places go by their counters."""
    scheduler = FairScheduler(max_running=4, max_queued=100, max_background=2)
    turns: dict[str, list[Turn]] = {"acme": [], "initech": []}
    for _ in range(200):
        turns["acme"].append(enter(scheduler, "acme", background=True))
        turns["initech"].append(enter(scheduler, "initech", background=True, weight=2.0))
    served: Counter[str] = Counter()
    for _ in range(150):
        running = [t for ts in turns.values() for t in ts if t.granted.done() and not t.done]
        assert len(running) == 2
        first = min(running, key=lambda t: t.started or 0.0)
        scheduler.served(first, 16)
        served[first.tenant] += 1
        scheduler.leave(first)
    assert 1.7 < served["initech"] / served["acme"] < 2.3


async def test_a_waiting_background_request_leaves_no_trace_when_cancelled() -> None:
    scheduler = FairScheduler(max_running=2, max_queued=100)
    first = enter(scheduler, "acme", background=True)
    second = enter(scheduler, "acme", background=True)
    assert first.granted.done()
    assert not second.granted.done()
    scheduler.leave(second)  # withdrawn before it started
    assert scheduler.background_queued == 0
    scheduler.leave(first)
    assert scheduler.background_running == 0
    assert scheduler.load() == {}


async def test_a_tenants_load_counts_its_background_band_apart() -> None:
    """What the admin API and the TUI show per tenant: interactive requests as before, the band's
    (batch lines, flex requests) beside them, and a tenant with only batch work is listed."""
    scheduler = FairScheduler(max_running=4, max_queued=100)
    lines = [enter(scheduler, "acme", background=True) for _ in range(5)]
    chat = enter(scheduler, "acme")
    enter(scheduler, "globex")
    only_batch = [enter(scheduler, "initech", background=True) for _ in range(2)]
    assert scheduler.tenant_load("acme") == TenantLoad(
        queued=0, running=1, background_queued=3, background_running=2
    )
    assert scheduler.load()["initech"] == TenantLoad(0, 0, background_queued=2, background_running=0)
    assert scheduler.load()["globex"] == TenantLoad(0, 1)
    for turn in [*lines, chat, *only_batch]:
        scheduler.leave(turn)
    assert set(scheduler.load()) == {"globex"}
    assert scheduler.tenant_load("acme") == TenantLoad(0, 0)
