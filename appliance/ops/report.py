"""`lorabox status` and `lorabox ps` as text: the admin API's payloads, for a terminal.

Every value may be missing or null (docs/admin-api.md); it then shows as N/A.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

NA = "N/A"


def size(n: Any) -> str:
    if not isinstance(n, int | float):
        return NA
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def number(value: Any, unit: str = "", digits: int = 1) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return NA
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return NA
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{v}{u}" for v, u in parts if v][:2]
    return " ".join(shown) or "0s"


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _device(device: Mapping[str, Any]) -> list[str]:
    host = device.get("host") or {}
    if device.get("kind") != "gpu":
        return [
            f"device   CPU only: {number(host.get('cpu_pct'), '%')} of {number(host.get('cpus'))} cores, "
            f"host memory {size(host.get('memory_used'))} / {size(host.get('memory_total'))}"
        ]
    lines = []
    for gpu in device.get("gpus") or []:
        memory = f"VRAM {size(gpu.get('memory_used'))} / {size(gpu.get('memory_total'))}"
        power = f"{number(gpu.get('power_w'), ' W', 0)} / {number(gpu.get('power_limit_w'), ' W', 0)}"
        lines.append(
            f"GPU {gpu.get('index')}    {gpu.get('name') or NA}: {memory} (lorabox "
            f"{size(gpu.get('process_memory'))}), util {number(gpu.get('utilization_pct'), '%', 0)}, "
            f"{number(gpu.get('temperature_c'), ' °C', 0)}, {power}"
        )
    if not lines:
        lines.append(f"GPU      {NA}: the daemon cannot read the GPU (NVML)")
    if split := device.get("vram_split"):
        lines.append(
            "VRAM     " + ", ".join(f"{use.replace('_', ' ')} {size(v)}" for use, v in split.items())
        )
    return lines


def _ledger(ledger: Mapping[str, Any]) -> list[str]:
    """A line only when usage rows wait (in memory or in the spool) or cannot be written."""
    if not (ledger.get("pending_rows") or ledger.get("spooled_rows") or ledger.get("unavailable")):
        return []
    failures = ledger.get("write_failures") or {}
    line = (
        f"ledger   {number(ledger.get('pending_rows'))} usage rows pending, "
        f"{number(ledger.get('spooled_rows'))} in the spool {ledger.get('spool_dir') or NA}; failed writes: "
        f"{number(failures.get('database'))} database, {number(failures.get('spool'))} spool"
    )
    return [line] + (
        [f"         refusing requests: {ledger['unavailable']}"] if ledger.get("unavailable") else []
    )


def _limits(limits: Mapping[str, Any]) -> list[str]:
    """A line only for shared limits: where, and whether they answer."""
    if limits.get("backend") != "redis":
        return []
    where = (
        f"{limits.get('url') or NA}, box {limits.get('box_id') or NA}, fail {limits.get('fail_mode') or NA}"
    )
    if not limits.get("down"):
        return [f"limits   shared in Redis {where}"]
    action = "counting on this box alone" if limits.get("fail_mode") == "open" else "refusing requests"
    return [f"limits   NOT SHARED for {duration(limits.get('down_s'))}: {limits['down']}; {action} ({where})"]


def _batches(batches: Mapping[str, Any]) -> list[str]:
    """A line only while batch work runs or waits: the band, then each job's progress."""
    band = batches.get("band") or {}
    jobs = batches.get("jobs") or []
    if not jobs and not band.get("running") and not band.get("queued"):
        return []
    share = number((band.get("share") or 0) * 100, "%", 0)
    line = (
        f"batches  {number(batches.get('active'))} active; band {number(band.get('running'))}/"
        f"{number(band.get('places'))} places, {number(band.get('queued'))} waiting, {share} of what runs"
    )
    progress = [
        f"{job.get('tenant')} {job.get('id')} {job.get('status')}: "
        f"{(job.get('completed') or 0) + (job.get('failed') or 0)}/{job.get('total') or 0} lines done, "
        f"{job.get('failed') or 0} failed"
        for job in jobs
    ]
    return [line] + [f"         {entry}" for entry in progress]


def status_text(status: Mapping[str, Any], tenants: Sequence[Mapping[str, Any]]) -> str:
    engine = status.get("engine_stats") or {}
    adapters = status.get("adapters") or {}
    totals = status.get("totals") or {}
    kv = engine.get("kv_cache_usage")
    kv_pct = number(kv * 100 if isinstance(kv, int | float) else None, "%", 0)
    state = str(status.get("state") or NA) + (f" ({status['reason']})" if status.get("reason") else "")
    tiers = " / ".join(f"{number(adapters.get(tier))} {tier}" for tier in ("gpu", "cpu", "disk"))
    served = f"{status.get('model') or NA} on {status.get('engine') or NA} at {status.get('api_url') or NA}"
    lines = [
        f"lorabox  {status.get('version') or NA}, {state}, up {duration(status.get('uptime_s'))}, "
        f"pid {status.get('pid') or NA}",
        f"serving  {served}  ({status.get('engine_reason') or ''})",
        *([f"WARNING  not vLLM: {status['engine_fallback']}"] if status.get("engine_fallback") else []),
        *_device(status.get("device") or {}),
        f"engine   {number(engine.get('running'))} running, {number(engine.get('waiting'))} waiting, "
        f"KV cache {kv_pct} used, {number(engine.get('gpu_slots'))} adapter slots; adapters {tiers}",
        f"totals   {number(totals.get('requests'))} requests, {number(totals.get('prompt_tokens'))} prompt"
        f" + {number(totals.get('completion_tokens'))} completion tokens, "
        f"{number(totals.get('rps_10s'))} req/s, {number(totals.get('tps_10s'))} tok/s over 10 s",
        *_ledger(status.get("ledger") or {}),
        *_limits(status.get("limits") or {}),
        *_batches(status.get("batches") or {}),
        "",
    ]
    rows = []
    for tenant in tenants:
        stats = tenant.get("stats") or {}
        e2e = stats.get("e2e_ms") or {}
        quota = tenant.get("quota") or {}
        rows.append(
            {
                "tenant": tenant.get("name"),
                "version": tenant.get("active_version") or "",
                "tier": tenant.get("tier") or "",
                "requests": stats.get("requests"),
                "prompt_tok": stats.get("prompt_tokens"),
                "compl_tok": stats.get("completion_tokens"),
                "req/s": number(stats.get("rps_10s")),
                "tok/s": number(stats.get("tps_10s")),
                "p50_ms": number(e2e.get("p50"), digits=0),
                "p95_ms": number(e2e.get("p95"), digits=0),
                "5xx": sum((stats.get("errors") or {}).values()),
                "4xx": sum((stats.get("client_errors") or {}).values()),
                "429": stats.get("rejected"),
                "run": _with_band(stats.get("running"), stats.get("background_running")),
                "queue": _with_band(stats.get("queued"), stats.get("background_queued")),
                "quota": number(quota.get("used_pct"), "%", 0) if tenant.get("quota") else NA,
            }
        )
    lines.append(table(rows, list(rows[0]) if rows else ["tenant"]))
    return "\n".join(lines)


def _with_band(interactive: Any, background: Any) -> Any:
    """`2+6`: 2 interactive requests and 6 of the background band (batch lines, flex requests)."""
    return f"{interactive}+{background}" if isinstance(background, int) and background > 0 else interactive


def ps_rows(adapters: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """`/admin/residency`'s adapters as `lorabox ps --json` gives them: `idle_since` in ISO 8601
    UTC (null while requests run on it, or when it was never used)."""
    rows = []
    for adapter in adapters:
        last_used = adapter.get("last_used")
        busy = bool(adapter.get("running"))
        idle_since = None
        if isinstance(last_used, int | float) and not busy:
            idle_since = datetime.fromtimestamp(last_used, UTC).isoformat(timespec="seconds")
        rows.append(
            {
                "tenant": adapter.get("tenant"),
                "version": adapter.get("version"),
                "size_bytes": adapter.get("size_bytes"),
                "tier": adapter.get("tier"),
                "pinned": bool(adapter.get("pinned")),
                "running": adapter.get("running") or 0,
                "idle_since": idle_since,
                "last_used": last_used,
            }
        )
    return rows


def ps_text(rows: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    now = time.time() if now is None else now
    shown = []
    for row in rows:
        if row["running"]:
            idle = f"busy ({row['running']} running)"
        elif row["last_used"] is None:
            idle = "never used"
        else:
            idle = f"{duration(now - row['last_used'])} ago"
        shown.append(
            {
                "tenant": row["tenant"],
                "version": row["version"],
                "size": size(row["size_bytes"]),
                "tier": row["tier"],
                "pinned": "pinned" if row["pinned"] else "",
                "idle since": idle,
            }
        )
    return table(shown, ["tenant", "version", "size", "tier", "pinned", "idle since"])
