"""The fair queue's logic on a simulated engine: VTC shares, the bound, no banked credit, the bounds
on waiting. (The live tests, tests/test_fairness.py, measure the same on the real engine.)"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

import pytest

from appliance.tenancy.scheduler import FairScheduler, QueueFull, Turn


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Client:
    """A closed-loop client: keeps `concurrency` requests outstanding, each `prompt` + `output` tokens."""

    concurrency: int
    prompt: int = 8
    output: int = 16
    weight: float = 1.0


def simulate(
    scheduler: FairScheduler,
    clients: dict[str, Client],
    steps: int,
    at_once: dict[str, list[bool]] | None = None,
) -> Counter[str]:
    """A batching engine: every step, each running request gets one token. Returns the cost served
    per tenant (prompt + 2 x completion), as the counters measure it; `at_once` gets, per tenant,
    whether each request started as it was sent."""
    served: Counter[str] = Counter()
    running: dict[Turn, int] = {}
    waiting: list[Turn] = []

    def send(tenant: str) -> None:
        client = clients[tenant]
        turn = scheduler.enter(
            tenant,
            weight=client.weight,
            max_concurrent=None,
            max_queued=1000,
            prompt_tokens=client.prompt,
            max_tokens=client.output,
        )
        waiting.append(turn)
        if at_once is not None:
            at_once.setdefault(tenant, []).append(turn.granted.done())

    for tenant, client in clients.items():
        for _ in range(client.concurrency):
            send(tenant)
    for _ in range(steps):
        for turn in [t for t in waiting if t.granted.done()]:
            waiting.remove(turn)
            running[turn] = clients[turn.tenant].output
            served[turn.tenant] += turn.prompt_tokens
        for turn in list(running):
            scheduler.served(turn, 1)
            served[turn.tenant] += 2
            running[turn] -= 1
            if running[turn] == 0:
                del running[turn]
                scheduler.leave(turn)
                send(turn.tenant)
    return served


def bound(scheduler: FairScheduler, client: Client) -> float:
    """The documented bound: max_running + 1 requests' cost (prompt + 2 x output) over the weight."""
    return (scheduler.max_running + 1) * (client.prompt + 2 * client.output) / client.weight


async def test_weights_two_to_one_get_two_to_one_service_when_both_are_backlogged() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    clients = {"a": Client(8, weight=2.0), "b": Client(8, weight=1.0)}
    served = simulate(scheduler, clients, steps=2000)
    assert served["a"] / served["b"] == pytest.approx(2.0, rel=0.02)
    assert abs(served["a"] / 2 - served["b"]) <= bound(scheduler, clients["b"])


async def test_a_flood_of_ten_times_the_concurrency_leaves_the_other_its_share() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    clients = {"flood": Client(30), "b": Client(3)}
    served = simulate(scheduler, clients, steps=2000)
    assert abs(served["b"] - served["flood"]) <= bound(scheduler, clients["b"])


async def test_fifo_gives_the_flood_what_it_sends() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000, fair=False)
    served = simulate(scheduler, {"flood": Client(30), "b": Client(3)}, steps=2000)
    assert served["b"] / (served["b"] + served["flood"]) < 0.15  # about 3 of 33


async def test_work_conserving_a_tenant_alone_gets_every_place() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    turns = [
        scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1) for _ in range(6)
    ]
    assert [t.granted.done() for t in turns] == [True] * 4 + [False] * 2
    assert scheduler.load()["a"].running == 4


async def test_a_tenant_with_nothing_running_starts_at_once_even_when_the_engine_is_full() -> None:
    scheduler = FairScheduler(max_running=2, max_queued=1000)
    for _ in range(5):
        scheduler.enter("flood", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    first = scheduler.enter("b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    second = scheduler.enter("b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    assert first.granted.done()  # on top of the two places: b had nothing running
    assert not second.granted.done()  # one on top per tenant, no more
    assert scheduler.running == 3


async def test_a_tenant_within_its_share_never_waits_behind_a_flood() -> None:
    # b keeps 2 requests in flight: its share of 4 places beside one other tenant. The flood keeps 20.
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    clients = {"flood": Client(20, output=64), "b": Client(2, output=64)}
    at_once: dict[str, list[bool]] = {}
    served = simulate(scheduler, clients, steps=4000, at_once=at_once)
    assert len(at_once["b"]) > 100
    assert all(at_once["b"])  # not one of b's requests waited
    assert not any(at_once["flood"][20:])  # the flood's requests (after the first) all queued
    # b runs its 2 throughout. A place b frees goes to the flood before b's next request comes, which
    # then starts on top: the engine holds 5, and b gets 2 of them.
    assert served["b"] / (served["b"] + served["flood"]) == pytest.approx(2 / 5, abs=0.02)


async def test_fifo_makes_the_same_tenant_wait() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000, fair=False)
    clients = {"flood": Client(20, output=64), "b": Client(2, output=64)}
    at_once: dict[str, list[bool]] = {}
    simulate(scheduler, clients, steps=4000, at_once=at_once)
    assert not any(at_once["b"][2:])  # after its first two, every one of b's requests waited


async def test_a_tenant_at_its_share_waits_for_its_own_to_end() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    for _ in range(10):
        scheduler.enter("flood", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    b = [
        scheduler.enter("b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1, max_tokens=16)
        for _ in range(3)
    ]
    assert [t.granted.done() for t in b] == [True, True, False]  # its share of 4 places is 2
    assert scheduler.running == 6  # on top, for now
    scheduler.leave(b[0])
    assert b[2].granted.done()  # below its share again: on top again
    heavy = [
        scheduler.enter("c", weight=2, max_concurrent=None, max_queued=10, prompt_tokens=1) for _ in range(3)
    ]
    # c's weight: 4 x 2 / (1 + 1 + 2) = 2 places; b's share is now 1, so it gets none on top.
    assert [t.granted.done() for t in heavy] == [True, True, False]
    b.append(scheduler.enter("b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1))
    assert not b[3].granted.done()


async def test_with_more_tenants_than_places_no_more_than_twice_max_running_run() -> None:
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    for _ in range(6):
        scheduler.enter("flood", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    light = [
        scheduler.enter(f"t{i}", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1, max_tokens=8)
        for i in range(10)
    ]
    # Each light tenant's share is one place (4 places, 11 tenants: at least one), yet only 4 go
    # on top: the engine is not handed more than twice max_running.
    assert sum(t.granted.done() for t in light) == 4
    assert scheduler.running == 8


async def test_long_prompts_within_the_share_get_no_more_than_the_share() -> None:
    # b keeps only its share in flight, but each request is a 500-token prompt for one token: going
    # on top whenever below its share, b would be charged 100 times the flood's service here.
    scheduler = FairScheduler(max_running=4, max_queued=1000)
    clients = {"flood": Client(20, prompt=8, output=64), "b": Client(2, prompt=500, output=1)}
    served = simulate(scheduler, clients, steps=4000)
    assert abs(served["b"] - served["flood"]) <= bound(scheduler, clients["b"])


async def test_a_tenant_more_than_one_request_ahead_gets_no_place_on_top() -> None:
    # Long prompts, one token each: below its share, yet each start charges b a whole prompt.
    scheduler = FairScheduler(max_running=2, max_queued=1000)
    for _ in range(5):
        scheduler.enter("flood", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    started = []
    for _ in range(3):
        turn = scheduler.enter(
            "b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1000, max_tokens=1
        )
        started.append(turn.granted.done())
        if turn.granted.done():
            scheduler.served(turn, 1)
            scheduler.leave(turn)
    # The first two start on top (b's counter lifted to the flood's, then one prompt ahead); the
    # third would put b two requests ahead of the flood that waits: it waits its turn.
    assert started == [True, True, False]
    assert scheduler.running == 2


async def test_a_returning_tenant_banks_no_credit() -> None:
    clock = Clock()
    scheduler = FairScheduler(max_running=1, max_queued=1000, clock=clock)
    # a runs alone for a long time: its counter grows far beyond b's (which never ran).
    for _ in range(50):
        turn = scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=10)
        scheduler.served(turn, 10)
        scheduler.leave(turn)
    hold = scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=10)
    queued_a = [
        scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=10) for _ in range(3)
    ]
    b_turns = [
        scheduler.enter("b", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=10) for _ in range(3)
    ]
    counters = scheduler.counters()
    assert counters["b"] >= counters["a"] - 30  # lifted to where a is, not left at 0
    # So b does not get every place until it has caught up 1,500 tokens: a and b alternate.
    order = []
    scheduler.leave(hold)
    while any(not t.done for t in queued_a + b_turns):
        started = next(t for t in queued_a + b_turns if t.granted.done() and not t.done)
        order.append(started.tenant)
        scheduler.served(started, 10)
        scheduler.leave(started)
    assert set(order[:4]) == {"a", "b"}, order


async def test_max_concurrent_holds_a_tenant_back_and_others_pass() -> None:
    scheduler = FairScheduler(max_running=8, max_queued=1000)
    a = [scheduler.enter("a", weight=1, max_concurrent=2, max_queued=10, prompt_tokens=1) for _ in range(3)]
    b = scheduler.enter("b", weight=1, max_concurrent=2, max_queued=10, prompt_tokens=1)
    assert [t.granted.done() for t in a] == [True, True, False]
    assert b.granted.done()
    scheduler.leave(a[0])
    assert a[2].granted.done()


async def test_queue_bounds_refuse_with_a_retry_after_and_leave_no_trace() -> None:
    scheduler = FairScheduler(max_running=1, max_queued=3)
    scheduler.enter("a", weight=1, max_concurrent=None, max_queued=2, prompt_tokens=1)  # runs
    for _ in range(2):
        scheduler.enter("a", weight=1, max_concurrent=None, max_queued=2, prompt_tokens=1)  # waits
    with pytest.raises(QueueFull) as tenant_full:
        scheduler.enter("a", weight=1, max_concurrent=None, max_queued=2, prompt_tokens=1)
    assert tenant_full.value.scope == "tenant"
    assert tenant_full.value.retry_after_s >= 1
    scheduler.enter("b", weight=1, max_concurrent=None, max_queued=5, prompt_tokens=1)  # on top: runs
    scheduler.enter("b", weight=1, max_concurrent=None, max_queued=5, prompt_tokens=1)  # the box's 3rd
    with pytest.raises(QueueFull) as box_full:
        scheduler.enter("b", weight=1, max_concurrent=None, max_queued=5, prompt_tokens=1)
    assert box_full.value.scope == "box"
    assert scheduler.queued == 3
    assert scheduler.load()["a"].queued == 2


async def test_a_request_cancelled_while_waiting_leaves_the_queue() -> None:
    scheduler = FairScheduler(max_running=1, max_queued=10)
    running = scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    waiting = scheduler.enter("a", weight=1, max_concurrent=None, max_queued=10, prompt_tokens=1)
    task = asyncio.create_task(scheduler.wait(waiting))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert scheduler.queued == 0
    scheduler.leave(running)
    assert scheduler.running == 0
    assert scheduler.load() == {}
