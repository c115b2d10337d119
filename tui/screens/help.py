"""`?`: the keys the screen below answers to (with --readonly, no actions), and how sorting works."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from ..widgets.tenants import SORT_ORDERS


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical {
        width: 84; height: auto; max-height: 90%; padding: 1 2;
        border: thick $primary; background: $surface;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,question_mark,q", "close", "Close")]

    def __init__(self, keys: list[tuple[str, str]], notes: list[str]) -> None:
        super().__init__()
        self.keys = keys
        self.notes = notes

    def compose(self) -> ComposeResult:
        table = Table.grid(padding=(0, 3))
        table.add_column(style="bold cyan", justify="right")
        table.add_column()
        for key, description in self.keys:
            table.add_row(key, description)
        orders = " → ".join(order.label for order in SORT_ORDERS)
        with Vertical():
            yield Static(Text("lorabox tui: keys", style="bold"))
            yield Static(table)
            yield Static(Text(f"\ns cycles the sort: {orders}.", style="dim"))
            for note in self.notes:
                yield Static(Text(note, style="dim"))
            yield Static(Text("\nescape or ? closes this help.", style="dim"))

    def action_close(self) -> None:
        self.dismiss(None)
