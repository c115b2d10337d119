"""The overview: header, hardware, the tenant table and the event log."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.message import Message
from textual.widgets import Footer, Input

from ..payload import Event, Status, Tenant
from ..widgets.banner import ConnectionBanner
from ..widgets.batches import BatchPanel
from ..widgets.device import DevicePanel
from ..widgets.events import EventLog
from ..widgets.header import StatusHeader
from ..widgets.tenants import TenantTable
from . import TenantScreen


class MainScreen(TenantScreen):
    DEFAULT_CSS = """
    MainScreen #filter { dock: bottom; display: none; margin-bottom: 1; border: tall $accent; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("escape", "clear_filter", "Clear filter"),
    ]

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="header")
        yield ConnectionBanner(id="banner")
        yield DevicePanel(id="device")
        yield BatchPanel(id="batches")
        yield TenantTable(id="tenants")
        yield EventLog(id="events")
        yield Input(placeholder="filter tenants by name", id="filter")
        yield Footer()

    class Ready(Message):
        """Composed and mounted: the feed may start drawing."""

    def on_mount(self) -> None:
        self.table.focus()
        self.post_message(self.Ready())

    @property
    def table(self) -> TenantTable:
        return self.query_one(TenantTable)

    @property
    def current_tenant(self) -> str | None:
        return self.table.selected

    def show_snapshot(self, status: Status, tenants: list[Tenant], feed: str) -> None:
        self.show_feed(status, feed)
        self.query_one(DevicePanel).show(status)
        self.query_one(BatchPanel).show(status.batches)
        self.table.show(tenants)

    def show_feed(self, status: Status | None, feed: str) -> None:
        self.query_one(StatusHeader).show(status, feed)

    def add_events(self, events: list[Event]) -> None:
        self.query_one(EventLog).add(events)

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value = ""
        field.display = False
        self.table.set_filter("")
        self.table.focus()
        self.refresh_bindings()

    def action_sort(self) -> None:
        self.table.cycle_sort()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "clear_filter":
            return bool(self.table.filter_text) or self.query_one("#filter", Input).display
        return True

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.table.set_filter(event.value)
        self.refresh_bindings()

    @on(Input.Submitted, "#filter")
    def filter_done(self, event: Input.Submitted) -> None:
        """The filter stays (the table's title shows it); `/` edits it, escape clears it."""
        event.input.display = False
        self.table.focus()
