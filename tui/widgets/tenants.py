"""The tenant table: one row per tenant with its live numbers, sortable and filterable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.color import Color
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.renderables.sparkline import Sparkline
from textual.widgets import DataTable

from .. import format as fmt
from ..payload import Tenant

SPARK_WIDTH = 14
QUOTA_WARN_PCT = 80.0


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    width: int
    cell: Callable[[Tenant], Text | Sparkline[float]]


@dataclass(frozen=True)
class SortOrder:
    label: str
    value: Callable[[Tenant], float | str | None]
    descending: bool

    def arrange(self, rows: list[Tenant]) -> list[Tenant]:
        """Sorted by this order, ties and unknown values (last) by name."""
        by_name = sorted(rows, key=lambda t: t.name)
        known = [t for t in by_name if self.value(t) is not None]
        known.sort(key=self.value, reverse=self.descending)  # type: ignore[arg-type,return-value]
        return known + [t for t in by_name if self.value(t) is None]


def _errors(t: Tenant) -> float | None:
    server, client = t.stats.server_errors, t.stats.client_error_count
    return None if server is None and client is None else float((server or 0) + (client or 0))


SORT_ORDERS = (
    SortOrder("tenant", lambda t: t.name, descending=False),
    SortOrder("req/s", lambda t: t.stats.rps_10s, descending=True),
    SortOrder("tok/s", lambda t: t.stats.tps_10s, descending=True),
    SortOrder("p95 latency", lambda t: t.stats.e2e_ms.p95, descending=True),
    SortOrder("errors", _errors, descending=True),
    SortOrder("429s", lambda t: t.stats.rejected, descending=True),
    SortOrder("queue", lambda t: t.stats.queued, descending=True),
    SortOrder("quota used", lambda t: t.quota.used_pct if t.quota else None, descending=True),
)


def _right(value: str, style: str = "") -> Text:
    return Text(value, style=style, justify="right")


def _name(t: Tenant) -> Text:
    return Text(t.name + (" (disabled)" if t.disabled else ""), style="dim" if t.disabled else "bold")


def _trend(t: Tenant) -> Text | Sparkline[float]:
    if not t.stats.history_rps:
        return Text("")
    return Sparkline(
        list(t.stats.history_rps),
        width=SPARK_WIDTH,
        min_color=Color.parse("#2e6b3a"),
        max_color=Color.parse("#5fd75f"),
    )


def _count(n: int | None, alert: str = "") -> Text:
    return _right(fmt.count(n), alert if n else "dim" if n == 0 else "")


def _with_band(n: int | None, background: int | None) -> Text:
    """Interactive requests, then `+N` for the tenant's batch lines and flex requests (the
    background band), when it has any: a tenant whose batch runs is not idle."""
    cell = _count(n, "bold")
    if background:
        cell.append(f"+{background}", style="cyan")
    return cell


def _version(t: Tenant) -> Text:
    cell = Text(fmt.text(t.active_version))
    if t.pinned_version:
        cell.append(" pinned", style="yellow")
    if t.canary:
        cell.append(f" +{t.canary.version} {t.canary.percent:g}%", style="cyan")
    return cell


def _tier(t: Tenant) -> Text:
    cell = Text(fmt.text(t.tier), style={"gpu": "green", "cpu": "yellow"}.get(t.tier or "", "dim"))
    if t.keep_resident:
        cell.append(" kept", style="bold")
    return cell


def _quota(t: Tenant) -> Text:
    if t.quota is None:
        return _right(fmt.NA)
    if t.quota.limit_tokens is None and t.quota.used_pct is None:
        return _right("no cap", "dim")
    used = t.quota.used_pct
    style = (
        "" if used is None else "bold red" if used >= 100 else "bold yellow" if used >= QUOTA_WARN_PCT else ""
    )
    return _right(fmt.pct(used), style)


COLUMNS = (
    Column("tenant", "Tenant", 20, _name),
    Column("rps", "req/s", 6, lambda t: _right(fmt.rate(t.stats.rps_10s))),
    Column("trend", "req/s trend", SPARK_WIDTH, _trend),
    Column("tps", "tok/s", 7, lambda t: _right(fmt.rate(t.stats.tps_10s))),
    Column("p50", "p50", 8, lambda t: _right(fmt.ms(t.stats.e2e_ms.p50))),
    Column("p95", "p95", 8, lambda t: _right(fmt.ms(t.stats.e2e_ms.p95))),
    Column("5xx", "5xx", 5, lambda t: _count(t.stats.server_errors, "bold red")),
    Column("4xx", "4xx", 5, lambda t: _count(t.stats.client_error_count, "yellow")),
    Column("429", "429", 5, lambda t: _count(t.stats.rejected, "yellow")),
    Column("queue", "queue", 5, lambda t: _with_band(t.stats.queued, t.stats.background_queued)),
    Column("running", "run", 4, lambda t: _with_band(t.stats.running, t.stats.background_running)),
    Column("version", "version", 20, _version),
    Column("tier", "tier", 9, _tier),
    Column("quota", "quota", 6, _quota),
)


class TenantTable(DataTable[Text | Sparkline[float]]):
    DEFAULT_CSS = """
    TenantTable { height: 2fr; min-height: 6; border: round $primary; }
    TenantTable:focus { border: round $accent; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Detail")]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.order_index = 0
        self.filter_text = ""
        self._rows: list[Tenant] = []
        self._shown: list[str] = []

    def on_mount(self) -> None:
        for column in COLUMNS:
            label = Text(column.label, justify="right" if column.width <= 8 else "left")
            self.add_column(label, width=column.width, key=column.key)
        self._retitle()

    @property
    def ordering(self) -> SortOrder:
        return SORT_ORDERS[self.order_index]

    @property
    def shown(self) -> list[str]:
        """Tenant names in the order the rows show them."""
        return list(self._shown)

    @property
    def selected(self) -> str | None:
        if not self._shown:
            return None
        return self._shown[min(self.cursor_row, len(self._shown) - 1)]

    def show(self, rows: list[Tenant]) -> None:
        self._rows = rows
        self._redraw()

    def cycle_sort(self) -> SortOrder:
        self.order_index = (self.order_index + 1) % len(SORT_ORDERS)
        self._redraw()
        return self.ordering

    def set_filter(self, text: str) -> None:
        self.filter_text = text.strip()
        self._redraw()

    def _redraw(self) -> None:
        wanted = self.filter_text.lower()
        visible = self.ordering.arrange([t for t in self._rows if wanted in t.name.lower()])
        names = [t.name for t in visible]
        if names == self._shown:
            for tenant in visible:
                for column in COLUMNS:
                    self.update_cell(tenant.name, column.key, column.cell(tenant))
        else:
            selected = self.selected
            self.clear()
            for tenant in visible:
                self.add_row(*(column.cell(tenant) for column in COLUMNS), key=tenant.name)
            self._shown = names
            if selected in names:
                self.move_cursor(row=names.index(selected), animate=False)
        self._retitle()

    def _retitle(self) -> None:
        order = self.ordering
        title = f"Tenants {len(self._shown)}"
        if len(self._shown) != len(self._rows):
            title += f" of {len(self._rows)}"
        title += f" · sort: {order.label} {'↓' if order.descending else '↑'}"
        if self.filter_text:
            title += f" · filter: {self.filter_text!r}"
        self.border_title = title
