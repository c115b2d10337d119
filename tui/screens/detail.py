"""One tenant up close: versions with the canary split, limits, keys, recent requests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import ClassVar
from urllib.parse import quote

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Label, Sparkline, Static

from appliance.api.adminclient import AdminClient, AdminError, AdminUnavailable

from .. import format as fmt
from ..payload import Tenant, TenantDetail, Version
from ..widgets.banner import ConnectionBanner
from ..widgets.device import bar
from . import TenantScreen

log = logging.getLogger(__name__)

SPLIT_WIDTH = 40
VERSION_COLUMNS = (
    "version", "state", "active", "canary", "rank", "size", "tier", "GPU pin",
    "requests", "errors", "TTFT p50/p95", "latency p50/p95", "why refused",
)  # fmt: skip
RECENT_COLUMNS = (
    "time", "model", "version", "endpoint", "status", "prompt tok", "compl. tok",
    "TTFT", "latency", "finish",
)  # fmt: skip


def _yes(value: bool | None) -> str:
    return fmt.NA if value is None else "yes" if value else ""


def _pair(p50: float | None, p95: float | None) -> str:
    return f"{fmt.ms(p50)} / {fmt.ms(p95)}"


def _day(ts: str | None) -> str:
    return fmt.text(ts)[:10]


def _setting(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and abs(value) >= 10_000:
        return fmt.count(value)
    return "not set" if value is None else str(value)


def version_row(v: Version) -> list[Text]:
    state_style = {"ready": "green", "held": "yellow"}.get(v.state or "", "red" if v.state else "")
    return [
        Text(v.version, style="bold" if v.active else ""),
        Text(fmt.text(v.state), style=state_style),
        Text(_yes(v.active), style="bold green"),
        Text(fmt.pct(v.canary_percent) if v.canary_percent else "", style="cyan"),
        Text(fmt.text(v.rank), justify="right"),
        Text(fmt.size(v.size_bytes), justify="right"),
        Text(fmt.text(v.tier)),
        Text(_yes(v.pinned)),
        Text(fmt.count(v.requests), justify="right"),
        Text(fmt.count(v.errors), justify="right", style="red" if v.errors else ""),
        Text(_pair(v.ttft_ms.p50, v.ttft_ms.p95), justify="right"),
        Text(_pair(v.e2e_ms.p50, v.e2e_ms.p95), justify="right"),
        Text(v.reason, style="yellow" if v.state == "held" else "red")
        if v.reason
        else Text(v.note or "", style="yellow"),
    ]


def traffic_split(detail: TenantDetail) -> Text:
    """Where the tenant's requests go: the active version, and the canary's share."""
    tenant = detail.tenant
    line = Text("traffic  ", style="dim")
    if tenant.canary is None:
        return line.append(f"100% to {fmt.text(tenant.active_version)} (no canary)")
    share = min(max(tenant.canary.percent, 0.0), 100.0)
    line.append(f"{fmt.text(tenant.active_version)} {100 - share:g}% ", style="bold")
    line.append_text(bar([(100 - share, "#4a90d9"), (share, "cyan")], 100, SPLIT_WIDTH))
    line.append(f" {tenant.canary.version} {share:g}% (canary)", style="bold cyan")
    return line


def summary(tenant: Tenant) -> Text:
    line = Text()
    line.append(tenant.name, style="bold")
    if tenant.disabled:
        line.append(" (disabled)", style="bold red")
    pieces = [
        f"active {fmt.text(tenant.active_version)}",
        f"pinned to {tenant.pinned_version}" if tenant.pinned_version else "follows the newest version",
        f"canary {tenant.canary.version} {tenant.canary.percent:g}%" if tenant.canary else "no canary",
        f"tier {fmt.text(tenant.tier)}" + (" (kept resident)" if tenant.keep_resident else ""),
        "may use the base model" if tenant.allow_base_model else "adapter only",
    ]
    line.append("   " + " · ".join(pieces))
    return line


def limits(tenant: Tenant) -> Text:
    lines = Text()
    for name, value in tenant.policy:
        lines.append(f"{name.replace('_', ' '):<16}", style="dim")
        lines.append(f"{_setting(value)}\n")
    quota = tenant.quota
    lines.append(f"{'quota used':<16}", style="dim")
    if quota is None:
        return lines.append(fmt.NA)
    limit = "(no cap)" if quota.limit_tokens is None else f"of {fmt.count(quota.limit_tokens)}"
    lines.append(f"{fmt.count(quota.used_tokens)} {limit}")
    if quota.used_pct is not None:
        lines.append(f" = {fmt.pct(quota.used_pct)}", style="bold")
    if quota.period_start:
        lines.append(f"\n{'period start':<16}", style="dim")
        lines.append(quota.period_start[:10])
    return lines


class DetailScreen(TenantScreen):
    DEFAULT_CSS = """
    DetailScreen #summary { height: 1; padding: 0 1; background: $boost; }
    DetailScreen #problem { height: auto; padding: 0 1; color: $error; }
    DetailScreen DataTable { height: auto; max-height: 10; border: round $primary; }
    DetailScreen #split { padding: 0 1; height: 1; }
    DetailScreen #middle { height: auto; }
    DetailScreen #history { width: 2fr; height: auto; border: round $primary; }
    DetailScreen #limits { width: 1fr; height: auto; border: round $primary; padding: 0 1; }
    DetailScreen #keys { width: 1fr; }
    DetailScreen .spark-label { padding: 0 1; color: $text-muted; }
    DetailScreen Sparkline { height: 3; margin: 0 1; }
    DetailScreen #recent { height: 1fr; max-height: 100%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,backspace", "back", "Back")]

    def __init__(self, tenant: str, client: AdminClient, interval_s: Callable[[], float]) -> None:
        super().__init__()
        self.tenant = tenant
        self.client = client
        self.interval_s = interval_s
        self.detail: TenantDetail | None = None

    @property
    def current_tenant(self) -> str | None:
        return self.tenant

    def compose(self) -> ComposeResult:
        yield Static(Text(self.tenant, style="bold"), id="summary")
        yield ConnectionBanner(id="banner")
        yield Static("loading …", id="problem")
        yield DataTable(id="versions", cursor_type="row", zebra_stripes=True)
        yield Static(id="split")
        with Horizontal(id="middle"):
            with Vertical(id="history"):
                yield Label("requests/s", classes="spark-label")
                yield Sparkline(id="rps")
                yield Label("tokens/s", classes="spark-label")
                yield Sparkline(id="tps")
            yield Static(id="limits")
            yield DataTable(id="keys", cursor_type="row")
        yield DataTable(id="recent", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        titles = {"versions": "Versions", "keys": "API keys", "recent": "Recent requests (newest first, UTC)"}
        columns = {
            "versions": VERSION_COLUMNS,
            "keys": ("key id", "created", "revoked"),
            "recent": RECENT_COLUMNS,
        }
        for table_id, title in titles.items():
            table = self.query_one(f"#{table_id}", DataTable)
            table.border_title = title
            table.add_columns(*columns[table_id])
        self.query_one("#limits", Static).border_title = "Limits"
        self.query_one("#history", Vertical).border_title = "History, oldest to newest"
        self.query_one("#versions", DataTable).focus()
        self.poll()

    @work(exclusive=True, group="detail")
    async def poll(self) -> None:
        while True:
            await self.load()
            await asyncio.sleep(self.interval_s())

    async def load(self) -> None:
        problem = ""
        try:
            raw = await self.client.request("GET", f"/admin/tenants/{quote(self.tenant, safe='')}")
            self.show(TenantDetail.read(raw, self.tenant))
        except AdminError as exc:
            problem = f"no tenant named {self.tenant}" if exc.status == 404 else f"the daemon said: {exc}"
        except AdminUnavailable as exc:
            problem = str(exc)
        except Exception as exc:  # a surprise in one payload must not take the TUI down
            log.exception("tenant detail failed")
            problem = f"unexpected {type(exc).__name__}: {exc}"
        status = self.query_one("#problem", Static)
        status.display = bool(problem)
        status.update(problem + (" (showing the last data received)" if problem and self.detail else ""))

    def show(self, detail: TenantDetail) -> None:
        self.detail = detail
        tenant = detail.tenant
        self.query_one("#summary", Static).update(summary(tenant))
        self.query_one("#split", Static).update(traffic_split(detail))
        self.query_one("#limits", Static).update(limits(tenant))
        step = tenant.stats.history_interval_s
        history = "History, oldest to newest" + (f" (one point per {step:g} s)" if step else "")
        self.query_one("#history", Vertical).border_title = history
        self.query_one("#rps", Sparkline).data = list(tenant.stats.history_rps)
        self.query_one("#tps", Sparkline).data = list(tenant.stats.history_tps)
        self._fill("versions", [version_row(v) for v in detail.versions])
        self._fill(
            "keys",
            [
                [
                    Text(k.key_id, style="dim" if k.revoked_at else "bold"),
                    Text(_day(k.created_at)),
                    Text(_day(k.revoked_at) if k.revoked_at else "", style="yellow"),
                ]
                for k in detail.keys
            ],
        )
        self._fill(
            "recent",
            [
                [
                    Text(fmt.clock(r.ts)),
                    Text(fmt.text(r.model)),
                    Text(fmt.text(r.adapter_version)),
                    Text(fmt.text(r.endpoint)),
                    Text(fmt.text(r.status), style="green" if r.status == 200 else "red"),
                    Text(fmt.count(r.prompt_tokens), justify="right"),
                    Text(fmt.count(r.completion_tokens), justify="right"),
                    Text(fmt.ms(r.ttft_ms), justify="right"),
                    Text(fmt.ms(r.latency_ms), justify="right"),
                    Text(fmt.text(r.finish_reason)),
                ]
                for r in detail.recent
            ],
        )

    def _fill(self, table_id: str, rows: list[list[Text]]) -> None:
        table = self.query_one(f"#{table_id}", DataTable)
        cursor = table.cursor_row
        table.clear()
        table.add_rows(rows)
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1), animate=False, scroll=False)

    def action_back(self) -> None:
        self.dismiss(None)
