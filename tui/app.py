"""`lorabox tui`: the box at a glance, over the admin API only.

All network I/O runs in async workers on Textual's loop (the feed, the detail poll, each action);
handlers only draw what arrived. Actions (a, p, c, k) exist only without --readonly.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any, ClassVar
from urllib.parse import quote

from textual import on
from textual.app import App
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from appliance.api.adminclient import AdminClient, AdminError, AdminUnavailable

from . import format as fmt
from .feed import Backoff, Feed, FeedEvents, FeedSnapshot, FeedState
from .payload import Status, Tenant, TenantDetail, Version
from .screens import TenantScreen
from .screens.detail import DetailScreen
from .screens.dialogs import ChoiceDialog, ConfirmDialog, PercentDialog
from .screens.help import HelpScreen
from .screens.main import MainScreen

log = logging.getLogger(__name__)

INTERVALS_S = (1.0, 2.0, 5.0, 10.0)
ACTIONS = frozenset({"activate", "pin", "canary", "revoke"})
# Choice ids that cannot be version names (those start with a letter or digit).
FOLLOW_NEWEST = ":newest"
END_CANARY = ":end"
FEED_LABELS = {"live": "live", "polling": "polling", "down": "disconnected", "connecting": "connecting"}


class LoraboxApp(App[None]):
    TITLE = "lorabox"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("r", "cycle_interval", "Refresh rate"),
        Binding("a", "activate", "Activate/rollback"),
        Binding("p", "pin", "Pin/unpin"),
        Binding("c", "canary", "Canary"),
        Binding("k", "revoke", "Revoke key"),
    ]

    def __init__(
        self,
        client: AdminClient,
        *,
        readonly: bool = False,
        interval_s: float = 2.0,
        backoff: Backoff | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.readonly = readonly
        self.interval_s = interval_s
        self.feed = Feed(client, self.post_message, backoff or Backoff())
        self.main = MainScreen()
        self.status: Status | None = None
        self.tenants: dict[str, Tenant] = {}
        self.connection = FeedState("connecting")

    def get_default_screen(self) -> MainScreen:
        return self.main

    def on_main_screen_ready(self) -> None:
        self._show_connection()
        self._start_feed()

    def _start_feed(self) -> None:
        self.run_worker(self.feed.run(self.interval_s), name="feed", group="feed", exclusive=True)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.readonly and action in ACTIONS)

    # What the feed brings.

    def on_feed_snapshot(self, message: FeedSnapshot) -> None:
        self.status = message.status
        self.tenants = {t.name: t for t in message.tenants}
        self.main.show_snapshot(message.status, message.tenants, self._feed_label())

    def on_feed_events(self, message: FeedEvents) -> None:
        self.main.add_events(message.events)

    def on_feed_state(self, message: FeedState) -> None:
        self.connection = message
        self._show_connection()

    def _show_connection(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, TenantScreen):
                screen.show_connection(self.connection, self.client.socket_path, self.status is not None)
        self.main.show_feed(self.status, self._feed_label())

    def _feed_label(self) -> str:
        return (
            f"{FEED_LABELS.get(self.connection.state, self.connection.state)} · every {self.interval_s:g} s"
        )

    # Navigation.

    @on(DataTable.RowSelected, "#tenants")
    def open_detail(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            screen = DetailScreen(event.row_key.value, self.client, lambda: self.interval_s)
            self.push_screen(screen)
            screen.show_connection(self.connection, self.client.socket_path, self.status is not None)

    def action_help(self) -> None:
        shown = [active.binding for active in self.screen.active_bindings.values() if active.binding.show]
        keys = [(self.get_key_display(binding), binding.description) for binding in shown]
        notes = [
            f"Refresh: every {self.interval_s:g} s; r cycles {', '.join(f'{i:g}' for i in INTERVALS_S)} s."
        ]
        if self.readonly:
            notes.append("Read-only (--readonly): activate, pin, canary and revoke are off.")
        self.push_screen(HelpScreen(keys, notes))

    def action_cycle_interval(self) -> None:
        later = [i for i in INTERVALS_S if i > self.interval_s]
        self.interval_s = later[0] if later else INTERVALS_S[0]
        self._start_feed()
        self.main.show_feed(self.status, self._feed_label())
        self.notify(f"Refreshing every {self.interval_s:g} s")

    # Actions: each asks what it needs in dialogs, then makes one POST.

    def _current_tenant(self) -> str | None:
        screen = self.screen
        tenant = screen.current_tenant if isinstance(screen, TenantScreen) else None
        if tenant is None:
            self.notify("No tenant selected", severity="warning")
        return tenant

    def _act(self, flow: Coroutine[Any, Any, None]) -> None:
        self.run_worker(self._reporting(flow), group="action", exclusive=True)

    async def _reporting(self, flow: Coroutine[Any, Any, None]) -> None:
        try:
            await flow
        except (AdminError, AdminUnavailable) as exc:
            self.notify(str(exc), title="Not done", severity="error", timeout=8)
        except Exception as exc:  # whatever the socket answered, the TUI stays up
            log.exception("action failed")
            self.notify(f"unexpected {type(exc).__name__}: {exc}", title="Not done", severity="error")
        else:
            if isinstance(self.screen, DetailScreen):
                await self.screen.load()

    async def _detail(self, tenant: str) -> TenantDetail:
        return TenantDetail.read(await self.client.request("GET", f"/admin/tenants/{_path(tenant)}"), tenant)

    async def _post(self, path: str, body: object) -> dict[str, Any]:
        result = await self.client.request("POST", path, body)
        return result if isinstance(result, dict) else {}

    def action_activate(self) -> None:
        if tenant := self._current_tenant():
            self._act(self._activate(tenant))

    async def _activate(self, tenant: str) -> None:
        detail = await self._detail(tenant)
        options = [(FOLLOW_NEWEST, "follow the newest version (no pin)")]
        options += [(v.version, _describe(v)) for v in detail.versions if v.state in (None, "ready")]
        choice = await self.push_screen_wait(ChoiceDialog(f"{tenant}: serve which version?", options))
        if choice is None:
            return
        version = None if choice == FOLLOW_NEWEST else choice
        result = await self._post(f"/admin/tenants/{_path(tenant)}/activate", {"version": version})
        active = fmt.text(result.get("active", version))
        self.notify(f"{tenant} serves {active}" + (" (pinned)" if version else ", following the newest"))

    def action_pin(self) -> None:
        if tenant := self._current_tenant():
            self._act(self._pin(tenant))

    async def _pin(self, tenant: str) -> None:
        row = self.tenants.get(tenant)
        keep = not (row and row.keep_resident)
        await self._post(f"/admin/tenants/{_path(tenant)}/resident", {"keep": keep})
        self.notify(f"{tenant}: " + ("kept in a GPU slot" if keep else "no longer kept resident"))

    def action_canary(self) -> None:
        if tenant := self._current_tenant():
            self._act(self._canary(tenant))

    async def _canary(self, tenant: str) -> None:
        detail = await self._detail(tenant)
        current = detail.tenant.canary
        options = (
            [(END_CANARY, f"end the canary ({current.version} {current.percent:g}%)")] if current else []
        )
        options += [
            (v.version, _describe(v)) for v in detail.versions if v.state in (None, "ready") and not v.active
        ]
        if not options:
            self.notify(f"{tenant} has no other ready version to try", severity="warning")
            return
        version = await self.push_screen_wait(ChoiceDialog(f"{tenant}: canary which version?", options))
        if version is None:
            return
        path = f"/admin/tenants/{_path(tenant)}/canary"
        if version == END_CANARY:
            assert current is not None
            await self._post(path, {"version": current.version, "percent": 0})
            self.notify(f"{tenant}: canary ended")
            return
        start = int(current.percent) if current and current.version == version else 10
        percent = await self.push_screen_wait(
            PercentDialog(f"{tenant}: what share of requests goes to {version}? (percent)", start)
        )
        if percent is None:
            return
        await self._post(path, {"version": version, "percent": percent})
        self.notify(f"{tenant}: {percent}% of requests go to {version}")

    def action_revoke(self) -> None:
        if tenant := self._current_tenant():
            self._act(self._revoke(tenant))

    async def _revoke(self, tenant: str) -> None:
        keys = [k for k in (await self._detail(tenant)).keys if not k.revoked_at]
        if not keys:
            self.notify(f"{tenant} has no active key", severity="warning")
            return
        options = [(k.key_id, f"{k.key_id}   created {fmt.text(k.created_at)[:16]}") for k in keys]
        key_id = await self.push_screen_wait(ChoiceDialog(f"{tenant}: revoke which key?", options))
        if key_id is None:
            return
        question = (
            f"Revoke key {key_id} of {tenant}?\n\nRequests with this key get 401 from the next one on. "
            "This cannot be undone."
        )
        if not await self.push_screen_wait(ConfirmDialog(question, yes="Revoke")):
            return
        await self._post(f"/admin/keys/{_path(key_id)}/revoke", {})
        self.notify(f"Revoked key {key_id} of {tenant}")


def _path(name: str) -> str:
    return quote(name, safe="")


def _describe(v: Version) -> str:
    notes = [
        "active" if v.active else "",
        f"canary {v.canary_percent:g}%" if v.canary_percent else "",
        "pinned" if v.pinned else "",
        f"{fmt.count(v.requests)} requests" if v.requests is not None else "",
        f"rank {v.rank}" if v.rank is not None else "",
    ]
    return f"{v.version:<12} " + " · ".join(n for n in notes if n)


def run(socket_path: str, *, readonly: bool = False, interval_s: float = 2.0) -> None:
    LoraboxApp(AdminClient(socket_path, timeout_s=30), readonly=readonly, interval_s=interval_s).run()
