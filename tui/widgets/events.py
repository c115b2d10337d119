"""The event pane: drops registered or refused, activations, rollbacks, key changes, as they happen."""

from __future__ import annotations

from collections import deque

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from .. import format as fmt
from ..payload import Event

KIND_STYLES = {
    "adapter_refused": "bold red",
    "adapter_deactivated": "bold red",
    "residency_pin_failed": "red",
    "adapter_rolled_back": "yellow",
    "adapter_held": "yellow",
    "adapter_base_mismatch": "yellow",
    "key_revoked": "yellow",
    "daemon_restarted": "bold yellow",
    "adapter_registered": "green",
    "adapter_activated": "green",
    "key_issued": "green",
    "tenant_added": "green",
    "canary_set": "cyan",
    "canary_cleared": "cyan",
    "adapter_pinned": "cyan",
    "adapter_unpinned": "cyan",
    "adapter_base_accepted": "cyan",
}


def style_of(kind: str) -> str:
    if kind in KIND_STYLES:
        return KIND_STYLES[kind]
    if "fail" in kind or "refus" in kind or "exceed" in kind:
        return "red"
    return "yellow" if "warn" in kind else "dim"


def line(event: Event) -> Text:
    subject = event.tenant or ""
    if event.version:
        subject += f"@{event.version}"
    row = Text()
    row.append(f"{fmt.clock(event.ts)}  ", style="dim")
    row.append(f"{event.kind:<22}", style=style_of(event.kind))
    row.append(f" {subject:<20} ")
    row.append(event.detail or "")
    return row


class EventLog(VerticalScroll):
    """Newest first, so the latest is in view without scrolling; older ones scroll below."""

    DEFAULT_CSS = """
    EventLog { height: 1fr; min-height: 5; border: round $primary; padding: 0 1; background: $surface; }
    """
    KEPT = 300

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.events: deque[Event] = deque(maxlen=self.KEPT)
        self.border_title = "Events, newest first (times UTC)"

    def compose(self) -> ComposeResult:
        yield Static()

    def add(self, events: list[Event]) -> None:
        self.events.extend(events)
        lines = Text("\n", no_wrap=True, overflow="ellipsis").join(line(e) for e in reversed(self.events))
        self.query_one(Static).update(lines)
