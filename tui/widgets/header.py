"""The top lines: what serves (engine, model), since when, where, whether it is ready, and the totals."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .. import format as fmt
from ..payload import Status

STATE_STYLES = {
    "ready": "bold green",
    "starting": "bold yellow",
    "draining": "bold yellow",
    "refusing": "bold red",  # the usage ledger can write nowhere: no request is served
    "failed": "bold red",
}


def _field(line: Text, label: str, value: str, style: str = "bold") -> None:
    line.append(f"{label} ", style="dim")
    line.append(value, style=style)
    line.append("   ")


class StatusHeader(Static):
    DEFAULT_CSS = """
    StatusHeader { height: 2; padding: 0 1; background: $boost; }
    """

    def show(self, status: Status | None, feed: str) -> None:
        self.update(self._render_status(status, feed))

    @staticmethod
    def _render_status(received: Status | None, feed: str) -> Text:
        status = received or Status()
        if received is None:
            state = "no data yet"
        elif status.state:
            state = status.state
        elif status.ready is not None:
            state = "ready" if status.ready else "not ready"
        else:
            state = fmt.NA
        first = Text()
        first.append("lorabox", style="bold")
        first.append(f" {status.version} " if status.version else " ", style="dim")
        first.append("● ", style=STATE_STYLES.get(state, "bold red" if status.ready is False else "dim"))
        first.append(state, style=STATE_STYLES.get(state, "bold"))
        first.append("   ")
        _field(first, "engine", fmt.text(status.engine))
        _field(first, "model", fmt.text(status.model))
        _field(first, "up", fmt.duration(status.uptime_s))
        _field(first, "API", fmt.text(status.api_url))
        _field(first, "pid", fmt.text(status.pid), style="")
        first.append(feed, style="dim italic")

        second = Text()
        if status.reason:
            second.append(f"not ready: {status.reason}   ", style="bold red")
        if status.engine_fallback:  # never silent: vLLM should serve, and this says how to make it
            second.append(f"fallback to {status.engine}: {status.engine_fallback}   ", style="bold yellow")
        elif status.engine_reason:
            second.append(f"{status.engine_reason}   ", style="dim")
        totals = status.totals
        second.append("totals ", style="dim")
        second.append(
            f"{fmt.count(totals.requests)} req · {fmt.rate(totals.rps_10s)} req/s · "
            f"{fmt.rate(totals.tps_10s)} tok/s · {fmt.text(totals.running)} running · "
            f"{fmt.text(totals.queued)} queued"
        )
        return Text("\n").join([first, second])
