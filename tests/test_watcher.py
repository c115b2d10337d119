"""DropWatcher against real watchdog (inotify) events in a temporary drop folder.

Waits poll up to a generous deadline, so a loaded machine makes them slower, not red; the facts
about order (no call before the copy ends, never two calls at once) are asserted strictly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from watchdog.utils import BaseThread

from appliance.adapters.watcher import DropWatcher, snapshot
from appliance.telemetry.looplag import LoopLagMonitor
from tests.conftest import bounded, tmpfs_dir

# watchdog 7.1 warns, harmlessly, when a nested folder is created faster than it adds its watches.
pytestmark = pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")

QUIET_S = 0.2
POLL_S = 0.1
# Long enough after the last change that a callback that was due has happened.
SETTLED_S = QUIET_S + POLL_S + 0.4
DEADLINE_S = 5.0


@dataclass
class Call:
    tenant: str
    start: float
    end: float = float("inf")


class Recorder:
    """An on_change that records when each call ran, and can be slow or fail. With `together`,
    each call also lasts until that many calls have started (or DEADLINE_S has passed): calls that
    can overlap then do, however late a loaded machine delivers the events."""

    def __init__(self, delay_s: float = 0.0, failures: int = 0, together: int = 0) -> None:
        self.calls: list[Call] = []
        self.delay_s = delay_s
        self.failures = failures
        self.together = together
        self._all_started = asyncio.Event()
        self.running: Counter[str] = Counter()
        self.max_running: Counter[str] = Counter()

    async def __call__(self, tenant: str) -> None:
        call = Call(tenant, time.monotonic())
        self.calls.append(call)
        if len(self.calls) >= self.together:
            self._all_started.set()
        self.running[tenant] += 1
        self.max_running[tenant] = max(self.max_running[tenant], self.running[tenant])
        try:
            await asyncio.sleep(self.delay_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_started.wait(), DEADLINE_S)
            if self.failures:
                self.failures -= 1
                raise RuntimeError(f"cannot load {tenant}")
        finally:
            self.running[tenant] -= 1
            call.end = time.monotonic()

    def finished(self) -> int:
        return sum(call.end < float("inf") for call in self.calls)

    def tenants(self) -> list[str]:
        return [call.tenant for call in self.calls]


StartWatcher = Callable[..., Awaitable[tuple[DropWatcher, Recorder]]]


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


@pytest.fixture
async def watch(adapters: Path) -> AsyncIterator[StartWatcher]:
    """Start a watcher on the drop folder (stopped after the test); returns it and its recorder."""
    started: list[DropWatcher] = []

    async def start(recorder: Recorder | None = None, **timing: float) -> tuple[DropWatcher, Recorder]:
        recorder = recorder or Recorder()
        watcher = DropWatcher(adapters, recorder, **({"quiet_s": QUIET_S, "poll_s": POLL_S} | timing))
        await watcher.start()
        started.append(watcher)
        return watcher, recorder

    yield start
    for watcher in started:
        await watcher.stop()


async def eventually(condition: Callable[[], object], what: str, within: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"after {within} s still not: {what}")
        await asyncio.sleep(0.02)


def drop_version(folder: Path, weights: bytes = b"\0" * 4096) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)


def watchdog_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if isinstance(thread, BaseThread)]


async def test_a_new_tenant_is_reported_once_after_quiet_s(watch: StartWatcher, adapters: Path) -> None:
    watcher, recorder = await watch()
    assert adapters.is_dir()  # noqa: ASYNC240 (created by start)
    drop_version(adapters / "acme" / "v1")
    written = time.monotonic()

    await eventually(lambda: watcher.dirty_tenants() == {"acme"}, "acme pending")
    await eventually(lambda: recorder.calls, "a call")
    assert recorder.calls[0].start >= written + QUIET_S
    for path in (adapters / "acme" / "v1").iterdir():  # readers, like the server's inspection,
        path.read_bytes()  # change nothing
    await asyncio.sleep(SETTLED_S)
    assert recorder.tenants() == ["acme"]
    assert watcher.dirty_tenants() == set()


async def test_a_burst_of_writes_gives_one_call_after_it_ends(watch: StartWatcher, adapters: Path) -> None:
    drop_version(adapters / "acme" / "v1")
    weights = adapters / "acme" / "v1" / "adapter_model.safetensors"
    _, recorder = await watch()

    for _ in range(50):
        with weights.open("ab") as fh:
            fh.write(b"\1" * 1024)
        await asyncio.sleep(0.01)
    burst_end = time.monotonic()

    await eventually(lambda: recorder.calls, "a call")
    await asyncio.sleep(SETTLED_S)
    assert 1 <= len(recorder.calls) <= 2
    assert all(call.start >= burst_end for call in recorder.calls)


async def test_a_partial_copy_is_reported_only_once_renamed(watch: StartWatcher, adapters: Path) -> None:
    drop_version(adapters / "acme" / "v1")
    watcher, recorder = await watch()

    partial = adapters / "acme" / ".v2.partial"
    drop_version(partial, weights=b"")
    with (partial / "adapter_model.safetensors").open("ab") as fh:
        for _ in range(12):
            fh.write(b"\1" * 4096)
            fh.flush()
            await asyncio.sleep(0.05)
    await asyncio.sleep(SETTLED_S)
    assert recorder.calls == []
    assert watcher.dirty_tenants() == set()

    renamed = time.monotonic()
    partial.rename(adapters / "acme" / "v2")
    await eventually(lambda: recorder.calls, "a call after the rename")
    await asyncio.sleep(SETTLED_S)
    assert recorder.tenants() == ["acme"]
    assert recorder.calls[0].start >= renamed + QUIET_S


async def test_a_copy_in_progress_at_tenant_level_is_invisible(watch: StartWatcher, adapters: Path) -> None:
    _, recorder = await watch()
    drop_version(adapters / ".beta.tmp" / "v1")
    await asyncio.sleep(SETTLED_S)
    assert recorder.calls == []

    (adapters / ".beta.tmp").rename(adapters / "beta")
    await eventually(lambda: recorder.calls, "a call after the rename")
    assert recorder.tenants() == ["beta"]


@pytest.mark.parametrize("removed", ["acme/v2", "acme"])
async def test_deletions_are_reported(watch: StartWatcher, adapters: Path, removed: str) -> None:
    drop_version(adapters / "acme" / "v1")
    drop_version(adapters / "acme" / "v2")
    _, recorder = await watch()

    shutil.rmtree(adapters / removed)
    await eventually(lambda: recorder.calls, "a call after the deletion")
    await asyncio.sleep(SETTLED_S)
    assert recorder.tenants() == ["acme"]


async def test_a_move_between_tenants_reports_both(watch: StartWatcher, adapters: Path) -> None:
    drop_version(adapters / "acme" / "v1")
    (adapters / "beta").mkdir()
    _, recorder = await watch()

    (adapters / "acme" / "v1").rename(adapters / "beta" / "v1")
    await eventually(lambda: len(recorder.calls) >= 2, "two calls")
    assert sorted(recorder.tenants()) == ["acme", "beta"]


async def test_tenants_changed_together_are_handled_concurrently(watch: StartWatcher, adapters: Path) -> None:
    _, recorder = await watch(Recorder(together=2))
    drop_version(adapters / "acme" / "v1")
    drop_version(adapters / "beta" / "v1")

    await eventually(lambda: recorder.finished() == 2, "two calls")
    assert sorted(recorder.tenants()) == ["acme", "beta"]
    first, second = recorder.calls
    assert second.start < first.end, "different tenants wait for each other"


async def test_a_failing_on_change_is_logged_and_watching_goes_on(
    watch: StartWatcher, adapters: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, recorder = await watch(Recorder(failures=1))
    with caplog.at_level(logging.ERROR, logger="appliance.adapters.watcher"):
        drop_version(adapters / "acme" / "v1")
        await eventually(lambda: recorder.calls, "the failing call")
        await eventually(lambda: caplog.records, "the error logged")
    [record] = caplog.records
    assert "acme" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)

    drop_version(adapters / "acme" / "v2")
    await eventually(lambda: len(recorder.calls) == 2, "a call after the failure")


async def test_calls_for_one_tenant_never_overlap(watch: StartWatcher, adapters: Path) -> None:
    _, recorder = await watch(Recorder(delay_s=0.3))
    drop_version(adapters / "acme" / "v1")
    await eventually(lambda: recorder.calls, "the first call")

    drop_version(adapters / "acme" / "v2")  # while the first call still runs
    assert recorder.running["acme"] == 1
    await eventually(lambda: recorder.finished() == 2, "a second call")
    assert recorder.max_running["acme"] == 1
    assert recorder.calls[1].start >= recorder.calls[0].end


@pytest.mark.parametrize("via_link_outside", [False, True], ids=["in-place", "hard-link-outside"])
async def test_a_growing_file_is_reported_once_it_stops(
    watch: StartWatcher, adapters: Path, tmp_path: Path, via_link_outside: bool
) -> None:
    """quiet_s is shorter than the gaps between appends, so the check over poll_s holds the call:
    events during it (in place), or the snapshots alone (through a hard link outside the drop
    folder, appends raise no inotify event in it at all).
    """
    version = adapters / "acme" / "v1"
    drop_version(version)
    weights = version / "adapter_model.safetensors"
    if via_link_outside:
        os.link(weights, tmp_path / "elsewhere.safetensors")
        weights = tmp_path / "elsewhere.safetensors"
    _, recorder = await watch(quiet_s=0.02, poll_s=0.2)

    (version / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    for _ in range(10):
        with weights.open("ab") as fh:
            fh.write(b"\1" * 4096)
        await asyncio.sleep(0.05)
    grown = time.monotonic()

    await eventually(lambda: recorder.calls, "a call once the file stopped growing")
    assert recorder.calls[0].start >= grown
    assert recorder.tenants() == ["acme"]


async def test_stop_leaves_no_thread_and_no_pending_call(adapters: Path) -> None:
    recorder = Recorder()
    watcher = DropWatcher(adapters, recorder, quiet_s=QUIET_S, poll_s=POLL_S)
    app = web.Application()
    app.cleanup_ctx.append(lambda _app: watcher.run())
    runner = web.AppRunner(app)
    assert watchdog_threads() == []

    await runner.setup()
    assert watchdog_threads()
    drop_version(adapters / "acme" / "v1")
    await eventually(watcher.dirty_tenants, "acme pending")
    await runner.cleanup()

    assert watchdog_threads() == []
    assert watcher.dirty_tenants() == set()
    await asyncio.sleep(SETTLED_S)
    assert recorder.calls == []


def test_a_snapshot_neither_follows_nor_opens_odd_files(adapters: Path) -> None:
    version = adapters / "acme" / "v1"
    drop_version(version)
    os.mkfifo(version / "fifo")
    (version / "loop").symlink_to("loop")
    (version / "dangling").symlink_to("nowhere")
    (adapters / "acme" / "v2").symlink_to("v2")
    (version / "deeper" / "and-deeper").mkdir(parents=True)
    (version / "deeper" / "and-deeper" / "ignored").write_bytes(b"never read by inspection")

    paths = {path for path, _, _ in bounded(snapshot, adapters / "acme")}
    assert paths == {
        "v1",
        "v2",
        *(f"v1/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")),
        *(f"v1/{name}" for name in ("fifo", "loop", "dangling", "deeper")),
    }
    assert bounded(snapshot, adapters / "gone") == frozenset()


async def test_ten_thousand_versions_settle_without_holding_the_event_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """10,000 version folders present at start (a watch each) and 10,000 more dropped: snapshots
    and watchdog's start and stop run off the loop, events reach it coalesced, and reads raise no
    events (else watchdog's queue overflows and its recovery walk overflows it again, for ever).

    Measured two ways: no callback runs on the loop for 100 ms (asyncio's own slow-callback check:
    precisely what the watcher controls), and the loop is never a second late (a ticker: that also
    counts the loop's thread waiting for the GIL, less the time the machine kept it waiting for a
    CPU).
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    gc.freeze()  # as the daemon does once started: a full collection of a big heap stalls any loop
    try:
        with tmpfs_dir(tmp_path) as scratch, caplog.at_level(logging.WARNING, logger="asyncio"):
            adapters = scratch / "adapters"
            drop_version(adapters / "acme" / "v1")
            for i in range(10_000):
                os.makedirs(f"{adapters}/initech/v{i}")
            recorder = Recorder()
            watcher = DropWatcher(adapters, recorder, quiet_s=QUIET_S, poll_s=POLL_S)
            async with LoopLagMonitor(interval_s=0.01, stall_ms=1000).running() as monitor:
                await watcher.start()
                try:
                    await asyncio.to_thread(
                        lambda: [os.mkdir(f"{adapters}/acme/v{i}") for i in range(2, 10_002)]
                    )
                    await eventually(recorder.finished, "a call once the folders settled", within=60)
                finally:
                    await watcher.stop()
                lag = monitor.snapshot()
    finally:
        gc.unfreeze()
        loop.set_debug(False)
    assert recorder.tenants() == ["acme"]
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and " took " in r.getMessage()]
    assert slow == []
    assert lag.stalls == 0, f"the event loop was late by up to {lag.max_ms} ms"
