"""Says, in a line nobody can miss, that the daemon is not answering, why, and what happens next."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from ..feed import FeedState


class ConnectionBanner(Static):
    DEFAULT_CSS = """
    ConnectionBanner { display: none; height: auto; padding: 0 1; background: $error; color: $text; }
    ConnectionBanner.-connecting { background: $warning; }
    """

    def show(self, state: FeedState, socket: Path, have_data: bool) -> None:
        down = state.state == "down"
        connecting = state.state == "connecting" and not have_data
        self.display = down or connecting
        self.set_class(connecting, "-connecting")
        if connecting:
            self.update(Text(f"Connecting to the daemon at {socket} …", style="bold"))
        elif down:
            banner = Text()
            banner.append(f"The daemon is not answering at {socket}\n", style="bold")
            banner.append(f"{state.reason}\n")
            banner.append(f"Reconnecting: attempt {state.attempt}, next try in {state.retry_in_s:g} s.")
            if have_data:
                banner.append(" The figures below are the last ones received.")
            self.update(banner)
