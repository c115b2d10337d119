"""EngineHealth on a scripted engine: a death is seen at once (even during a probe), a hang once
a probe goes unanswered for its timeout, and the last good probe's time is kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from appliance.engines.health import EngineHealth
from appliance.errors import EngineDead
from appliance.testing.loadclock import LoadClock


class ScriptedEngine:
    """Only what the health watch uses: failure() and probe()."""

    def __init__(self) -> None:
        self.dead: str | None = None
        self.hangs = False
        self.probes = 0
        self.answered: list[float] = []  # when each probe answered (monotonic)
        self.polls_since_death = 0

    def failure(self) -> str | None:
        if self.dead:
            self.polls_since_death += 1
        return self.dead

    async def probe(self) -> None:
        self.probes += 1
        if self.dead:
            raise EngineDead(self.dead)
        if self.hangs:
            await asyncio.Event().wait()
        self.answered.append(time.monotonic())


async def until(condition: Callable[[], object], timeout_s: float = 30) -> None:
    """Wait for `condition` (the timeout only catches a hang: a loaded machine is slower, not red)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "a hang"
        await asyncio.sleep(0.01)


async def watch(engine: ScriptedEngine, **timing: float) -> tuple[EngineHealth, asyncio.Future[str]]:
    health = EngineHealth(engine, **{"probe_every_s": 0.05, "probe_timeout_s": 0.3, "poll_s": 0.01, **timing})  # type: ignore[arg-type]
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    health.start(failed.set_result)
    return health, failed


async def test_a_healthy_engine_is_probed_and_its_last_answer_kept():
    engine = ScriptedEngine()
    health, failed = await watch(engine)
    await until(lambda: engine.probes >= 3)
    await health.stop()
    stopped = time.monotonic()
    assert not failed.done()
    snapshot = health.snapshot()
    assert snapshot.failure is None
    assert health.last_ok is not None
    assert engine.answered[-1] <= health.last_ok <= stopped  # the last answer's, not an older one
    assert snapshot.last_ok_s_ago is not None
    assert snapshot.last_ok_s_ago >= 0


async def test_a_dead_engine_is_seen_at_once_even_while_a_probe_hangs():
    engine = ScriptedEngine()
    engine.hangs = True
    health, failed = await watch(engine, probe_timeout_s=60)
    await until(lambda: engine.probes == 1)  # a probe is waiting, and would for a minute
    engine.dead = "the core process exited"
    clock = LoadClock()
    reason = await asyncio.wait_for(failed, 30)
    assert reason == "the core process exited"
    assert engine.polls_since_death == 1  # seen at the first look, not after the probe
    assert clock.elapsed_s() < 0.5  # a poll is every 0.01 s (of the time the loop could run)
    assert health.snapshot().failure == reason


async def test_a_hung_engine_fails_once_a_probe_times_out():
    engine = ScriptedEngine()
    health, failed = await watch(engine)
    await asyncio.sleep(0.1)
    engine.hangs = True
    clock = LoadClock()
    began = time.monotonic()
    reason = await asyncio.wait_for(failed, 30)
    waited = time.monotonic() - began
    assert "did not answer a health probe within 0.3 s" in reason
    assert waited >= 0.3
    # The timeout, a probe interval and a few polls: of the time this loop was not kept waiting
    # for a CPU (appliance/testing/loadclock.py).
    assert clock.elapsed_s() < 1.0
    assert health.last_ok is not None  # from before the hang


async def test_a_probe_that_finds_the_engine_dead_fails_it():
    engine = ScriptedEngine()

    async def dead_probe() -> None:
        raise EngineDead("engine core gone")

    engine.probe = dead_probe  # type: ignore[method-assign]
    _, failed = await watch(engine)
    assert await asyncio.wait_for(failed, 1) == "engine core gone"


async def test_time_the_daemons_own_loop_could_not_run_is_not_the_engines():
    # The engine answers 0.8 s after the probe, but the loop is held for the first 1.5 s (a
    # starved daemon): its answer is read as soon as the loop runs again, not taken for a hang.
    engine = ScriptedEngine()
    answered = 0

    async def slow_probe() -> None:
        nonlocal answered
        await asyncio.sleep(0.8)
        answered += 1

    engine.probe = slow_probe  # type: ignore[method-assign]
    health, failed = await watch(engine, probe_every_s=10, probe_timeout_s=0.5)
    await asyncio.sleep(0.05)  # the first probe is out
    time.sleep(1.5)  # noqa: ASYNC251 (holding the loop is the point)
    await asyncio.sleep(0.5)
    await health.stop()
    assert not failed.done(), failed.result()
    assert answered == 1
    assert health.snapshot().last_ok_s_ago is not None


async def test_a_hang_is_still_a_hang_after_the_loop_was_held():
    engine = ScriptedEngine()
    engine.hangs = True
    _, failed = await watch(engine, probe_timeout_s=0.5)
    await asyncio.sleep(0.05)
    time.sleep(1.5)  # noqa: ASYNC251
    clock = LoadClock()
    reason = await asyncio.wait_for(failed, 30)
    assert clock.elapsed_s() < 2
    assert "did not answer a health probe within 0.5 s" in reason
