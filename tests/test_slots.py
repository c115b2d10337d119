"""SlotGate: pinned + distinct unpinned adapters in flight never exceed the GPU slots."""

from __future__ import annotations

import asyncio
import random
from collections import deque

import pytest

from appliance.engines.slots import STARVATION_S, SlotGate


def used(gate: SlotGate) -> int:
    return len(gate.pinned) + sum(1 for name in gate.running if name not in gate.pinned)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """One request holding the gate until released."""

    def __init__(self, gate: SlotGate, name: str):
        self.gate, self.name = gate, name
        self.entered = asyncio.Event()
        self.leave = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.gate.hold(self.name):
            self.entered.set()
            await self.leave.wait()

    async def finish(self) -> None:
        self.leave.set()
        await self.task


async def test_one_adapter_takes_one_slot_however_many_requests():
    gate = SlotGate(1)
    holders = [Holder(gate, "a") for _ in range(10)]
    await settle()
    assert all(h.entered.is_set() for h in holders)
    assert gate.running["a"] == 10
    assert used(gate) == 1
    for h in holders:
        await h.finish()
    assert not gate.running


async def test_a_new_adapter_waits_for_a_slot_then_runs():
    gate = SlotGate(2)
    a, b = Holder(gate, "a"), Holder(gate, "b")
    await settle()
    c = Holder(gate, "c")
    await settle()
    assert not c.entered.is_set()
    assert gate.waiting == 1
    await a.finish()
    await settle()
    assert c.entered.is_set()
    assert used(gate) == 2
    await b.finish()
    await c.finish()


async def test_busy_adapter_is_not_held_behind_a_tenant_waiting_for_a_slot():
    gate = SlotGate(2)
    a, b = Holder(gate, "a"), Holder(gate, "b")
    await settle()
    c = Holder(gate, "c")  # needs a slot of its own: waits
    await settle()
    a_again, b_again = Holder(gate, "a"), Holder(gate, "b")  # ride the slots a and b hold
    await settle()
    assert not c.entered.is_set()
    assert a_again.entered.is_set()
    assert b_again.entered.is_set()
    assert used(gate) == 2
    for h in (a, a_again):
        await h.finish()
    await settle()
    assert c.entered.is_set()  # a's slot came free
    for h in (b, b_again, c):
        await h.finish()


async def test_a_starving_waiter_gets_the_next_free_slot():
    clock = Clock()
    gate = SlotGate(2, starvation_s=5, clock=clock)
    a, b = Holder(gate, "a"), Holder(gate, "b")
    await settle()
    c = Holder(gate, "c")
    await settle()
    clock.now = 4.9
    early_a = Holder(gate, "a")  # c has not waited long: a newcomer on a busy adapter rides
    await settle()
    assert early_a.entered.is_set()
    clock.now = 5.0
    late_a, late_b = Holder(gate, "a"), Holder(gate, "b")  # c has waited long enough: they queue
    await settle()
    assert not late_a.entered.is_set()
    assert not late_b.entered.is_set()
    await b.finish()  # b drains first: its slot goes to c, not to b's newcomer
    await settle()
    assert c.entered.is_set()
    assert late_a.entered.is_set()  # rides a's slot again once nobody starving is ahead
    assert not late_b.entered.is_set()  # b lost its slot: now it waits for one
    assert used(gate) == 2
    for h in (a, early_a, late_a):
        await h.finish()
    await settle()
    assert late_b.entered.is_set()
    for h in (c, late_b):
        await h.finish()
    assert not gate.running


async def test_a_busy_adapter_cannot_keep_its_slot_from_a_waiter_for_ever():
    clock = Clock()
    gate = SlotGate(1, starvation_s=3, clock=clock)
    a_requests = deque([Holder(gate, "a")])
    await settle()
    c = Holder(gate, "c")
    await settle()
    while not c.entered.is_set() and clock.now < 20:
        clock.now += 1
        a_requests.append(Holder(gate, "a"))  # overlapping traffic: a never idles by itself
        await settle()
        await a_requests.popleft().finish()
        await settle()
    assert c.entered.is_set()
    assert clock.now == 3  # the starvation bound, not the end of a's traffic
    await c.finish()
    await settle()
    assert a_requests[0].entered.is_set()
    await a_requests[0].finish()


async def test_pinned_adapter_passes_while_others_wait():
    gate = SlotGate(2)
    await gate.pin("p")
    a = Holder(gate, "a")
    await settle()
    b = Holder(gate, "b")
    await settle()
    assert not b.entered.is_set()
    p = Holder(gate, "p")
    await settle()
    assert p.entered.is_set()
    assert used(gate) == 2
    for h in (a, p):
        await h.finish()
    await settle()
    assert b.entered.is_set()
    await b.finish()


async def test_pin_waits_until_its_slot_is_free_of_other_work():
    gate = SlotGate(2)
    a, b = Holder(gate, "a"), Holder(gate, "b")
    await settle()
    pin = asyncio.create_task(gate.pin("p"))
    await settle()
    assert not pin.done()
    assert "p" not in gate.pinned
    await a.finish()
    await pin
    assert gate.pinned == {"p"}
    assert used(gate) == 2
    await b.finish()


async def test_pinning_every_slot_is_allowed_but_not_more():
    gate = SlotGate(2)
    await gate.pin("p")
    await gate.pin("q")
    with pytest.raises(ValueError, match="all 2 GPU slots are pinned"):
        await gate.pin("r")
    a = Holder(gate, "a")
    await settle()
    assert not a.entered.is_set()
    gate.forget("q")
    await settle()
    assert a.entered.is_set()
    await a.finish()


async def test_a_cancelled_waiter_leaves_the_queue():
    clock = Clock()
    gate = SlotGate(1, starvation_s=1, clock=clock)
    a = Holder(gate, "a")
    await settle()
    b = Holder(gate, "b")
    await settle()
    clock.now = 1
    c = Holder(gate, "a")  # held back behind b, which starves
    await settle()
    assert gate.waiting == 2
    b.task.cancel()
    await settle()
    assert c.entered.is_set()
    assert gate.waiting == 0
    await a.finish()
    await c.finish()
    with pytest.raises(asyncio.CancelledError):
        await b.task
    assert not gate.running


async def test_exclusive_drains_one_adapter_and_holds_only_it():
    gate = SlotGate(3)
    a = Holder(gate, "a")
    await settle()
    inside = asyncio.Event()
    release = asyncio.Event()

    async def exclusive() -> None:
        async with gate.exclusive("a"):
            inside.set()
            await release.wait()

    task = asyncio.create_task(exclusive())
    await settle()
    assert not inside.is_set()  # "a" still has a request running
    late_a, other = Holder(gate, "a"), Holder(gate, "b")
    await settle()
    assert other.entered.is_set()
    assert not late_a.entered.is_set()
    await a.finish()
    await settle()
    assert inside.is_set()
    assert not late_a.entered.is_set()
    release.set()
    await task
    await settle()
    assert late_a.entered.is_set()
    for h in (late_a, other):
        await h.finish()


# 0: riders always queue behind a waiter; 2 ms: both policies mix; the default: riders never wait.
@pytest.mark.parametrize("starvation_s", [0.0, 0.002, STARVATION_S])
async def test_invariant_holds_under_random_traffic(starvation_s):
    rng = random.Random(7)  # noqa: S311 - a reproducible schedule, not a secret
    gate = SlotGate(4, starvation_s=starvation_s)
    worst = 0

    async def request(name: str) -> None:
        nonlocal worst
        async with gate.hold(name):
            worst = max(worst, used(gate))
            assert used(gate) <= gate.slots
            await asyncio.sleep(rng.random() / 1000)

    async def pinner(name: str) -> None:
        await asyncio.sleep(rng.random() / 200)
        await gate.pin(name)
        assert used(gate) <= gate.slots
        await asyncio.sleep(rng.random() / 200)
        async with gate.exclusive(name):
            gate.forget(name)

    names = [f"t{i}" for i in range(12)]
    jobs = [request(rng.choice(names)) for _ in range(600)] + [pinner("t0"), pinner("t1")]
    rng.shuffle(jobs)
    await asyncio.wait_for(asyncio.gather(*jobs), timeout=30)
    assert worst == gate.slots  # the gate was really under pressure
    assert not gate.running
    assert not gate.pinned
    assert gate.waiting == 0
