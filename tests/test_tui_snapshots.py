"""What `lorabox tui` looks like, state by state: SVG snapshots (pytest-textual-snapshot) at 160x45.

Each runs the app against recorded admin-API payloads on a real Unix socket (`replay`). Nothing
in them moves: the daemon's uptime, rates and history are recorded values, event times come from
the recording, and the socket is a relative path. `pytest --snapshot-update` rewrites them (look
at the report first); tests/__snapshots__/test_tui_snapshots/ holds the accepted ones.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from textual.pilot import Pilot

from appliance.api.adminclient import AdminClient
from appliance.testing.adminreplay import FIXTURES, AdminReplay
from tui.app import LoraboxApp
from tui.feed import Backoff
from tui.screens.detail import DetailScreen
from tui.screens.dialogs import ConfirmDialog
from tui.widgets.events import EventLog

SIZE = (160, 45)
Snap = Callable[..., bool]


def make_app(readonly: bool = False, backoff: Backoff | None = None) -> LoraboxApp:
    return LoraboxApp(AdminClient("admin.sock"), readonly=readonly, backoff=backoff or Backoff(0.05, 0.2))


async def until(pilot: Pilot[None], condition: Callable[[], object], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out before the snapshot"
        await pilot.pause(0.05)


def settled(replay: AdminReplay, then: Callable[[Pilot[None]], Awaitable[None]] | None = None) -> Callable:
    """Before the picture: the first snapshot and every recorded event are on screen."""

    async def run_before(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, LoraboxApp)
        log = app.main.query_one(EventLog)
        await until(pilot, lambda: app.main.table.shown and len(log.events) >= len(replay.events))
        if then is not None:
            await then(pilot)

    return run_before


def test_main_screen_gpu(snap_compare: Snap, replay: AdminReplay) -> None:
    """Header, the GPU panel with the VRAM split, the tenant table, the events (refused drop included)."""
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settled(replay))


def test_tenants_sorted_by_rate_and_filtered(snap_compare: Snap, replay: AdminReplay) -> None:
    assert snap_compare(
        make_app(), terminal_size=SIZE, run_before=settled(replay), press=["s", "slash", "e", "enter"]
    )


def test_cpu_only_panel(snap_compare: Snap, replay: AdminReplay) -> None:
    replay.status = json.loads((FIXTURES / "status_cpu.json").read_text())
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settled(replay))


def test_tenant_detail_with_canary(snap_compare: Snap, replay: AdminReplay) -> None:
    async def open_acme(pilot: Pilot[None]) -> None:
        await pilot.press("enter")
        screen = pilot.app.screen
        assert isinstance(screen, DetailScreen)
        await until(pilot, lambda: screen.detail is not None)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settled(replay, open_acme))


def test_daemon_down(snap_compare: Snap, replay: AdminReplay) -> None:
    replay.stop()

    async def down(pilot: Pilot[None]) -> None:
        app = pilot.app
        assert isinstance(app, LoraboxApp)
        await until(pilot, lambda: app.connection.state == "down")

    # A long backoff keeps the banner at its first attempt while the picture is taken.
    app = make_app(backoff=Backoff(30, 30))
    assert snap_compare(app, terminal_size=SIZE, run_before=down)


def test_revoke_confirmation(snap_compare: Snap, replay: AdminReplay) -> None:
    async def ask(pilot: Pilot[None]) -> None:
        await pilot.press("down", "k")
        await until(pilot, lambda: pilot.app.screen.query("OptionList"))
        await pilot.press("down", "enter")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmDialog))

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settled(replay, ask))
    assert replay.posts == []


def test_help_screen(snap_compare: Snap, replay: AdminReplay) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settled(replay), press=["question_mark"])


def test_readonly_main_screen(snap_compare: Snap, replay: AdminReplay) -> None:
    """No action keys in the footer."""
    assert snap_compare(make_app(readonly=True), terminal_size=SIZE, run_before=settled(replay))
