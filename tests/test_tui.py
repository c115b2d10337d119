"""`lorabox tui` driven by Textual's Pilot against recorded admin-API payloads.

The payloads (tests/fixtures/admin) are served by a real aiohttp app on a real Unix socket
(`replay`, appliance/testing/adminreplay.py), so the TUI's own AdminClient, SSE reader and
reconnection are what runs; nothing in the client is mocked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from appliance.api.adminclient import AdminClient, SSEParser
from appliance.ops.cli import main
from appliance.testing.adminreplay import FAULTS, AdminReplay
from tui.app import LoraboxApp
from tui.feed import Backoff
from tui.payload import Status, Version
from tui.screens.detail import DetailScreen, version_row
from tui.screens.dialogs import ChoiceDialog, ConfirmDialog, PercentDialog
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen
from tui.widgets.banner import ConnectionBanner
from tui.widgets.batches import BatchPanel
from tui.widgets.events import EventLog
from tui.widgets.header import StatusHeader

SIZE = (160, 45)
NAMES = ["acme", "globex", "hooli", "initech", "stark", "umbrella", "wayne"]


def make_app(**options: object) -> LoraboxApp:
    return LoraboxApp(AdminClient("admin.sock"), backoff=Backoff(0.05, 0.2), **options)  # type: ignore[arg-type]


async def until(
    pilot: Pilot[None], condition: Callable[[], object], what: str, timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


async def loaded(pilot: Pilot[None]) -> LoraboxApp:
    app = pilot.app
    assert isinstance(app, LoraboxApp)
    await until(pilot, lambda: app.status is not None and app.main.table.shown, "the first snapshot")
    return app


def cell(app: LoraboxApp, tenant: str, column: str) -> Text:
    value = app.main.table.get_cell(tenant, column)
    assert isinstance(value, Text)
    return value


def event_lines(app: LoraboxApp) -> list[str]:
    """The event pane's lines as drawn, newest first."""
    return str(app.main.query_one(EventLog).query_one(Static).render()).splitlines()


def banner(screen: object) -> ConnectionBanner:
    assert isinstance(screen, MainScreen | DetailScreen)
    return screen.query_one(ConnectionBanner)


async def test_tenant_table_shows_each_tenants_live_numbers(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert app.main.table.shown == NAMES
        assert cell(app, "hooli", "rps").plain == "4.8"
        assert cell(app, "hooli", "p95").plain == "2450 ms"
        assert cell(app, "wayne", "5xx").plain == "4"
        assert cell(app, "globex", "429").plain == "31"
        assert cell(app, "hooli", "queue").plain == "3"
        assert cell(app, "acme", "version").plain == "v2 +v3 10%"
        assert cell(app, "initech", "version").plain == "v1 pinned"
        assert cell(app, "acme", "tier").plain == "gpu kept"
        quota = cell(app, "globex", "quota")
        assert quota.plain == "86%"
        assert "yellow" in str(quota.style), "a quota over 80% stands out"
        assert cell(app, "acme", "quota").style == ""
        assert cell(app, "umbrella", "quota").plain == "no cap"
        assert cell(app, "stark", "rps").plain == "N/A"


async def test_sort_cycles_through_the_columns_and_says_which(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        table = app.main.table
        assert "sort: tenant ↑" in str(table.border_title)
        await pilot.press("s")
        assert "sort: req/s ↓" in str(table.border_title)
        # Highest rate first; a tenant with no rate at all (stark: N/A) last.
        assert table.shown == ["hooli", "acme", "wayne", "globex", "initech", "umbrella", "stark"]
        await pilot.press("s", "s")
        assert "sort: p95 latency ↓" in str(table.border_title)
        assert table.shown[:3] == ["hooli", "wayne", "globex"]
        await pilot.press("s", "s", "s", "s")
        assert "sort: quota used ↓" in str(table.border_title)
        assert table.shown == ["globex", "wayne", "hooli", "acme", "initech", "stark", "umbrella"]
        await pilot.press("s")
        assert table.shown == NAMES


async def test_filter_narrows_the_table_until_cleared(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        table = app.main.table
        await pilot.press("slash", "l")
        assert table.shown == ["globex", "hooli", "umbrella"]
        await pilot.press("enter")
        assert app.focused is table
        assert "filter: 'l'" in str(table.border_title)
        # The next tick redraws the same filtered rows.
        replay.tenants[1]["stats"]["rps_10s"] = 9.5
        await until(pilot, lambda: cell(app, "globex", "rps").plain == "9.5", "the next stats tick")
        assert table.shown == ["globex", "hooli", "umbrella"]
        await pilot.press("escape")
        assert table.shown == NAMES


async def test_enter_opens_the_tenant_detail(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("enter")  # the cursor is on acme, the first row
        screen = app.screen
        assert isinstance(screen, DetailScreen)
        assert screen.tenant == "acme"
        await until(pilot, lambda: screen.detail is not None, "the tenant's detail")
        versions = screen.query_one("#versions", DataTable)
        assert versions.row_count == 3
        assert [versions.get_row_at(i)[3].plain for i in range(3)] == ["", "", "10%"]
        assert versions.get_row_at(2)[8].plain == "82"  # requests served by the canary
        split = str(screen.query_one("#split", Static).render())
        assert "v2 90%" in split
        assert "v3 10% (canary)" in split
        limits = str(screen.query_one("#limits", Static).render())
        assert "rpm" in limits
        assert "120" in limits
        assert "24%" in limits
        assert screen.query_one("#keys", DataTable).row_count == 3
        assert screen.query_one("#recent", DataTable).row_count == 20
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_revoke_asks_first_and_posts_only_on_yes(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog), "the key picker")
        await pilot.press("enter")  # the first active key of acme
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
        assert "1a2b3c4d" in app.screen.question
        await pilot.press("enter")  # Cancel has the focus: a stray enter revokes nothing
        await until(pilot, lambda: isinstance(app.screen, MainScreen), "the dialog to close")
        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog), "the key picker")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
        await pilot.press("n")
        await pilot.pause(0.2)
        assert replay.posts == []

        await pilot.press("k")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog), "the key picker")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: replay.posts, "the revoke request")
        assert replay.posts == [("/admin/keys/1a2b3c4d/revoke", {})]
        # The daemon announces it on the stream; the event pane shows it.
        await until(
            pilot, lambda: any("key_revoked" in s and "1a2b3c4d" in s for s in event_lines(app)), "event"
        )


async def test_activate_canary_and_pin_post_what_was_chosen(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("a")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog), "the version picker")
        await pilot.press("down", "enter")  # below "follow the newest": v1
        await until(pilot, lambda: len(replay.posts) == 1, "the activate request")
        assert replay.posts[-1] == ("/admin/tenants/acme/activate", {"version": "v1"})

        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ChoiceDialog), "the canary picker")
        await pilot.press("down", "down", "enter")  # end canary, v1, v3 (v2 is active): v3
        await until(pilot, lambda: isinstance(app.screen, PercentDialog), "the percent")
        await pilot.press("backspace", "backspace", "2", "5", "enter")
        await until(pilot, lambda: len(replay.posts) == 2, "the canary request")
        assert replay.posts[-1] == ("/admin/tenants/acme/canary", {"version": "v3", "percent": 25})

        await pilot.press("p")  # acme is kept resident: p releases it
        await until(pilot, lambda: len(replay.posts) == 3, "the resident request")
        assert replay.posts[-1] == ("/admin/tenants/acme/resident", {"keep": False})
        await until(pilot, lambda: cell(app, "acme", "tier").plain == "gpu", "the table to follow")


async def test_readonly_offers_no_action_and_sends_nothing(replay: AdminReplay) -> None:
    app = make_app(readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        for key in ("k", "a", "p", "c"):
            await pilot.press(key)
            await pilot.pause(0.2)
            assert isinstance(app.screen, MainScreen), f"{key} opened something in read-only mode"
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DetailScreen), "the detail screen")
        await pilot.press("k", "a", "p", "c")
        await pilot.pause(0.3)
        assert isinstance(app.screen, DetailScreen)
        assert replay.posts == []
        assert not {"k", "a", "p", "c"} & set(app.screen.active_bindings), "footer must not offer actions"
        await pilot.press("question_mark")
        help_screen = app.screen
        assert isinstance(help_screen, HelpScreen)
        assert not {"Revoke key", "Canary", "Pin/unpin", "Activate/rollback"} & {
            d for _, d in help_screen.keys
        }


async def test_help_lists_the_keys(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await pilot.press("question_mark")
        screen = app.screen
        assert isinstance(screen, HelpScreen)
        described = dict(screen.keys)
        for key, description in [("k", "Revoke key"), ("s", "Sort"), ("/", "Filter"), ("r", "Refresh rate")]:
            assert described.get(key) == description
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_daemon_down_says_so_and_reconnects(replay: AdminReplay) -> None:
    replay.stop()
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        shown = banner(app.main)
        await until(pilot, lambda: app.connection.state == "down", "the daemon-down state")
        assert shown.display
        text = str(shown.render())
        assert "admin.sock" in text
        assert "no admin socket" in text
        assert "Reconnecting" in text

        replay.start()
        await loaded(pilot)
        await until(pilot, lambda: not shown.display, "the banner to go")
        assert app.main.table.shown == NAMES

        # It goes away again (killed: the socket file stays, connections are refused) ...
        replay.stop(remove_socket=False)
        await until(pilot, lambda: shown.display, "the banner to come back")
        assert "last ones received" in str(shown.render())
        assert app.main.table.shown == NAMES, "the last figures stay on screen"
        # ... and comes back as a new process.
        replay.status["pid"] = 4343
        replay.start()
        await until(pilot, lambda: not shown.display, "the reconnection")
        await until(pilot, lambda: any("pid 4242 → 4343" in s for s in event_lines(app)), "the restart note")


@pytest.mark.parametrize("fault", FAULTS)
async def test_hostile_payloads_never_crash_it(replay: AdminReplay, fault: str) -> None:
    replay.fault = fault
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        if fault in ("garbage", "500"):
            await until(pilot, lambda: app.connection.state == "down", "the daemon-down state")
            assert "not JSON" in app.connection.reason or "internal error" in app.connection.reason
        else:
            await until(pilot, lambda: app.status is not None, "a snapshot")
            assert app.main.table.shown == (["odd", "odder"] if fault == "wrong-types" else [])
            if fault == "wrong-types":
                await pilot.press("enter")
                await until(pilot, lambda: isinstance(app.screen, DetailScreen), "the detail screen")
                await pilot.pause(0.5)
                await pilot.press("escape")
        await pilot.pause(0.5)
        assert app.is_running
        replay.fault = None
        await until(pilot, lambda: app.main.table.shown == NAMES, "recovery", timeout_s=30)
        assert not banner(app.main).display


async def test_polls_a_daemon_without_the_stream(replay: AdminReplay) -> None:
    replay.stream_enabled = False
    app = make_app(interval_s=1.0)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert app.connection.state == "polling"
        assert not banner(app.main).display
        await until(pilot, lambda: any("adapter_refused" in s for s in event_lines(app)), "the events")
        replay.tenants[0]["stats"]["rps_10s"] = 7.5
        await until(pilot, lambda: cell(app, "acme", "rps").plain == "7.5", "the next poll")
        replay.tenants[0]["stats"]["rps_10s"] = 8.5
        await until(pilot, lambda: cell(app, "acme", "rps").plain == "8.5", "the poll after")
        # Each poll fetched the recent events again; each still shows once.
        assert sum("umbrella@v2" in s for s in event_lines(app)) == 1


async def test_events_arrive_live_and_once(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await until(pilot, lambda: len(event_lines(app)) == len(replay.events), "the backfilled events")
        replay.emit("adapter_refused", "acme", "v9", "adapter_config.json: not a LoRA adapter")
        await until(pilot, lambda: any("acme@v9" in s for s in event_lines(app)), "the new event")
        lines = event_lines(app)
        assert "adapter_refused" in lines[0]
        assert sum("umbrella@v2" in s for s in lines) == 1, "the refused drop in the recording shows once"


async def test_r_cycles_the_refresh_interval(replay: AdminReplay) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        assert replay.stream_intervals == [2.0]
        for expected in (5.0, 10.0, 1.0, 2.0):
            await pilot.press("r")
            assert app.interval_s == expected
            await until(pilot, lambda: replay.stream_intervals[-1] == expected, f"a stream at {expected} s")  # noqa: B023
        assert "every 2 s" in str(app.main.query_one("#header", Static).render())


def test_sse_parser_reassembles_events_split_anywhere() -> None:
    stream = b': keep-alive\r\nevent: stats\r\ndata: {"a":\ndata: 1}\n\nid: 7\ndata: x\n\n'
    for cut in range(len(stream)):
        parser = SSEParser()
        events = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert [(e.event, e.data, e.id) for e in events] == [
            ("stats", '{"a":\n1}', None),
            ("message", "x", "7"),
        ]


def test_cli_tui_finds_the_socket_in_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, bool, float]] = []
    monkeypatch.setattr(
        "tui.app.run", lambda socket, readonly, interval_s: calls.append((socket, readonly, interval_s))
    )
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    assert main(["tui", "--config", str(config), "--readonly"]) == 0
    assert main(["tui", "--socket", "/run/other.sock", "--interval", "5"]) == 0
    assert calls == [(str(tmp_path / "state" / "admin.sock"), True, 2.0), ("/run/other.sock", False, 5.0)]
    assert main(["tui", "--interval", "0.1"]) == 1  # one line: the refresh interval is 0.5 to 60 seconds


def test_a_version_trained_on_another_base_shows_its_note() -> None:
    """The admin payload's `note` (another base model) is shown where a refusal's reason is."""
    note = "trained on 'org/other'; this box serves 'lorabox-demo'"
    flagged = Version.read({"version": "v2", "state": "ready", "reason": "", "note": note})
    held = Version.read({"version": "v3", "state": "held", "reason": f"{note}; held", "note": note})
    assert flagged is not None
    assert held is not None
    assert (version_row(flagged)[-1].plain, version_row(flagged)[-1].style) == (note, "yellow")
    assert (version_row(held)[1].style, version_row(held)[-1].plain) == ("yellow", f"{note}; held")


async def test_the_header_says_why_llamacpp_serves_in_vllms_place(replay: AdminReplay) -> None:
    """A fallback is never silent: the reason and its fix, from the admin API, in the header."""
    fallback = (
        "vLLM's compiled kernels cannot load: libnuma.so.1 is missing (fix: sudo apt-get install libnuma1, "
        "then sudo systemctl restart lorabox)"
    )
    replay.status = replay.status | {"engine": "llamacpp", "engine_fallback": fallback}
    async with make_app().run_test(size=SIZE) as pilot:
        app = await loaded(pilot)
        assert f"fallback to llamacpp: {fallback}" in app.main.query_one("#header", Static).render().plain
    drawn = StatusHeader._render_status(Status.read(replay.status), "")
    assert [span.style for span in drawn.spans if fallback in drawn.plain[span.start : span.end]] == [
        "bold yellow"
    ]


async def test_a_tenants_batch_lines_show_beside_its_requests(replay: AdminReplay) -> None:
    """The run and queue cells: interactive requests, then `+N` (cyan) for the tenant's batch lines
    and flex requests in the background band; a tenant with batch work alone is not shown idle."""
    async with make_app().run_test(size=SIZE) as pilot:
        app = await loaded(pilot)
        assert cell(app, "acme", "running").plain == "2"
        acme = next(t for t in replay.tenants if t["name"] == "acme")
        acme["stats"] |= {"background_running": 6, "background_queued": 1}
        stark = next(t for t in replay.tenants if t["name"] == "stark")
        stark["stats"] = {"running": 0, "queued": 0, "background_running": 3}
        await until(pilot, lambda: cell(app, "acme", "running").plain == "2+6", "the next stats tick")
        assert cell(app, "acme", "queue").plain == "0+1"
        assert cell(app, "acme", "running").spans[-1].style == "cyan"
        await until(pilot, lambda: cell(app, "stark", "running").plain == "0+3", "stark's row")
        assert cell(app, "stark", "queue").plain == "0"


async def test_the_batch_panel_shows_the_band_and_each_jobs_progress_only_while_batches_run(
    replay: AdminReplay,
) -> None:
    async with make_app().run_test(size=SIZE) as pilot:
        app = await loaded(pilot)
        panel = app.main.query_one(BatchPanel)
        assert not panel.display  # no batch work: the overview is as it was
        replay.status = replay.status | {
            "batches": {
                "band": {"places": 4, "running": 3, "queued": 7, "interactive_running": 1, "share": 0.75},
                "active": 2,
                "jobs": [
                    {"id": "batch_a1", "tenant": "acme", "status": "in_progress", "total": 2000}
                    | {"completed": 500, "failed": 20},
                    {"id": "batch_g2", "tenant": "globex", "status": "validating", "total": 0}
                    | {"completed": 0, "failed": 0},
                ],
            }
        }
        await until(pilot, lambda: panel.display, "the batch panel")
        assert panel.border_title == "Batches: 2 active · band 3/4 places, 7 waiting, 75% of what runs"
        drawn = app.main.query_one(BatchPanel).render()
        console = app.console
        lines = [
            "".join(segment.text for segment in line)
            for line in console.render_lines(drawn, console.options.update_width(150))  # type: ignore[arg-type]
        ]
        acme = next(line for line in lines if line.startswith("acme"))
        assert "batch_a1" in acme
        assert "in_progress" in acme
        assert acme.rstrip().endswith("520/2,000, 20 failed")
        assert acme.count("█") > 0
        assert acme.count("░") > 2 * acme.count("█")  # 26% done
        assert any(line.startswith("globex") and "validating" in line for line in lines)
        replay.status = {k: v for k, v in replay.status.items() if k != "batches"}
        await until(pilot, lambda: not panel.display, "the batch panel to go")
