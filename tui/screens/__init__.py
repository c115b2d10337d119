"""The TUI's screens: the overview, a tenant's detail, and the modal dialogs on top of them."""

from __future__ import annotations

from pathlib import Path

from textual.screen import Screen

from ..feed import FeedState
from ..widgets.banner import ConnectionBanner


class TenantScreen(Screen[None]):
    """A screen about tenants: it names the tenant that actions (a, p, c, k) apply to, and it
    carries the connection banner."""

    _connection: tuple[FeedState, Path, bool] | None = None

    @property
    def current_tenant(self) -> str | None:
        raise NotImplementedError

    def show_connection(self, state: FeedState, socket: Path, have_data: bool) -> None:
        self._connection = (state, socket, have_data)
        if self.is_mounted:
            self.query_one(ConnectionBanner).show(*self._connection)

    def on_mount(self) -> None:
        if self._connection is not None:
            self.query_one(ConnectionBanner).show(*self._connection)
