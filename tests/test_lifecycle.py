"""Lifecycle: the server cuts requests as `Interrupted` (never as a client hang-up), refuses new
ones once stopping or failed, and winds down by draining first and cutting at the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from appliance.serving.lifecycle import ENGINE_FAILED, SHUTTING_DOWN, Interrupted, Lifecycle
from appliance.testing.loadclock import LoadClock


async def generation(lifecycle: Lifecycle, seconds: float, log: list[str]) -> str:
    """A request: tracked, waits on the 'engine' for `seconds`, then books itself."""
    with lifecycle.request() as in_flight:
        try:
            with in_flight.interruptible():
                await asyncio.sleep(seconds)
            outcome = "finished"
        except Interrupted as exc:
            outcome = exc.code
            await asyncio.sleep(0.01)  # tells its client: no stray cancellation may hit this
        log.append(outcome)  # its usage row
        return outcome


async def test_an_interrupted_request_learns_why_and_can_still_answer():
    lifecycle, log = Lifecycle(), []
    task = asyncio.create_task(generation(lifecycle, 60, log))
    await asyncio.sleep(0.01)
    lifecycle.interrupt(Interrupted.shutting_down())
    assert await task == SHUTTING_DOWN
    assert log == [SHUTTING_DOWN]
    assert lifecycle.in_flight == 0


async def test_a_client_hang_up_stays_a_cancellation():
    lifecycle, log = Lifecycle(), []
    task = asyncio.create_task(generation(lifecycle, 60, log))
    await asyncio.sleep(0.01)
    task.cancel()  # what aiohttp does when the client disconnects
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_hang_up_at_the_moment_of_the_cut_stays_a_cancellation():
    lifecycle, log = Lifecycle(), []
    task = asyncio.create_task(generation(lifecycle, 60, log))
    await asyncio.sleep(0.01)
    task.cancel()
    lifecycle.interrupt(Interrupted.shutting_down())
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_request_cut_before_it_reaches_the_engine_is_cut_on_arrival():
    lifecycle = Lifecycle()
    with lifecycle.request() as in_flight:
        lifecycle.interrupt(Interrupted.engine_failed("gone"))
        with pytest.raises(Interrupted) as raised, in_flight.interruptible():
            pytest.fail("must not run")
    assert raised.value.code == ENGINE_FAILED


async def test_once_stopping_or_failed_new_requests_are_refused():
    lifecycle = Lifecycle()
    assert lifecycle.phase == "serving"
    lifecycle.stop()
    assert lifecycle.phase == "stopping"
    with pytest.raises(Interrupted) as raised, lifecycle.request():
        pass
    assert raised.value.code == SHUTTING_DOWN
    lifecycle.fail("the core died")  # expected while stopping: not the daemon's failure
    assert lifecycle.phase == "stopping"

    lifecycle = Lifecycle()
    lifecycle.fail("the core died")
    assert lifecycle.phase == "failed"
    with pytest.raises(Interrupted) as raised, lifecycle.request():
        pass
    assert raised.value.code == ENGINE_FAILED
    assert "the core died" in raised.value.message


async def test_a_failure_cuts_everything_at_once_and_stops():
    lifecycle, log = Lifecycle(), []
    tasks = [asyncio.create_task(generation(lifecycle, 60, log)) for _ in range(3)]
    await asyncio.sleep(0.01)
    lifecycle.fail("the core died")
    await asyncio.wait_for(lifecycle.stopped(), 1)
    assert await asyncio.gather(*tasks) == [ENGINE_FAILED] * 3


async def test_wind_down_lets_quick_requests_finish_and_cuts_the_rest_at_the_deadline():
    lifecycle, log = Lifecycle(), []
    quick = [asyncio.create_task(generation(lifecycle, 0.05, log)) for _ in range(2)]
    slow = [asyncio.create_task(generation(lifecycle, 60, log)) for _ in range(2)]
    await asyncio.sleep(0.01)
    lifecycle.stop()
    clock = LoadClock()
    await lifecycle.wind_down(drain_s=0.3)
    assert time.monotonic() - clock.began >= 0.3  # drained (wall time, which load only lengthens)
    assert clock.elapsed_s() < 1.5  # and cut at the deadline (the time the loop was not kept waiting)
    assert await asyncio.gather(*quick) == ["finished"] * 2
    assert await asyncio.gather(*slow) == [SHUTTING_DOWN] * 2
    assert sorted(log) == sorted(["finished"] * 2 + [SHUTTING_DOWN] * 2)  # every one booked
    assert lifecycle.in_flight == 0


async def test_wind_down_after_a_failure_does_not_drain():
    lifecycle, log = Lifecycle(), []
    task = asyncio.create_task(generation(lifecycle, 60, log))
    await asyncio.sleep(0.01)
    lifecycle.fail("hung")
    await asyncio.wait_for(lifecycle.wind_down(drain_s=60), 30)  # not the 60 s drain
    assert await task == ENGINE_FAILED


async def test_a_second_stop_cuts_at_once():
    lifecycle, log = Lifecycle(), []
    task = asyncio.create_task(generation(lifecycle, 60, log))
    await asyncio.sleep(0.01)
    lifecycle.stop()
    winding_down = asyncio.create_task(lifecycle.wind_down(drain_s=60))
    await asyncio.sleep(0.05)
    assert not task.done()  # draining
    lifecycle.stop()  # a second Ctrl-C
    assert await asyncio.wait_for(task, 30) == SHUTTING_DOWN  # not the 60 s drain
    await asyncio.wait_for(winding_down, 30)
