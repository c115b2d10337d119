"""The admin API's payloads (docs/admin-api.md) as typed values, read so that nothing can fail.

Every field is optional: a missing field, a field of the wrong type, a non-finite number or a
payload that is not even an object becomes None (shown as N/A) or an empty collection. The TUI
draws only these values, so a daemon older or newer than the TUI, or a broken one, cannot crash it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def integer(value: Any) -> int | None:
    n = number(value)
    return int(n) if n is not None else None


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def numbers(value: Any) -> tuple[float, ...]:
    return tuple(n for n in (number(v) for v in items(value)) if n is not None)


def counts(value: Any) -> dict[str, int] | None:
    """`{"500": 1, "503": 2}`: responses by status; None when it is not an object."""
    if not isinstance(value, dict):
        return None
    return {str(k): n for k, v in value.items() if (n := integer(v)) is not None}


@dataclass(frozen=True)
class Percentiles:
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def read(cls, raw: Any) -> Percentiles:
        d = obj(raw)
        return cls(number(d.get("p50")), number(d.get("p95")), number(d.get("p99")))


@dataclass(frozen=True)
class Gpu:
    index: int | None
    name: str | None
    memory_total: float | None
    memory_used: float | None
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    process_memory: float | None

    @classmethod
    def read(cls, raw: Any) -> Gpu:
        d = obj(raw)
        return cls(
            integer(d.get("index")),
            text(d.get("name")),
            number(d.get("memory_total")),
            number(d.get("memory_used")),
            number(d.get("utilization_pct")),
            number(d.get("temperature_c")),
            number(d.get("power_w")),
            number(d.get("power_limit_w")),
            number(d.get("process_memory")),
        )


@dataclass(frozen=True)
class VramSplit:
    base_weights: float | None
    kv_cache: float | None
    adapter_slots: float | None
    other: float | None

    @classmethod
    def read(cls, raw: Any) -> VramSplit | None:
        if not isinstance(raw, dict):
            return None
        return cls(
            number(raw.get("base_weights")),
            number(raw.get("kv_cache")),
            number(raw.get("adapter_slots")),
            number(raw.get("other")),
        )


@dataclass(frozen=True)
class Host:
    memory_total: float | None = None
    memory_used: float | None = None
    cpu_pct: float | None = None
    cpus: int | None = None

    @classmethod
    def read(cls, raw: Any) -> Host:
        d = obj(raw)
        return cls(
            number(d.get("memory_total")),
            number(d.get("memory_used")),
            number(d.get("cpu_pct")),
            integer(d.get("cpus")),
        )


@dataclass(frozen=True)
class Device:
    kind: str | None = None
    gpus: tuple[Gpu, ...] = ()
    vram_split: VramSplit | None = None
    host: Host = field(default_factory=Host)

    @classmethod
    def read(cls, raw: Any) -> Device:
        d = obj(raw)
        return cls(
            text(d.get("kind")),
            tuple(Gpu.read(g) for g in items(d.get("gpus"))),
            VramSplit.read(d.get("vram_split")),
            Host.read(d.get("host")),
        )


@dataclass(frozen=True)
class EngineStats:
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    gpu_slots: int | None = None
    pinned: tuple[str, ...] | None = None

    @classmethod
    def read(cls, raw: Any) -> EngineStats | None:
        if not isinstance(raw, dict):
            return None
        return cls(
            integer(raw.get("running")),
            integer(raw.get("waiting")),
            number(raw.get("kv_cache_usage")),
            integer(raw.get("gpu_slots")),
            tuple(p for p in raw["pinned"] if isinstance(p, str))
            if isinstance(raw.get("pinned"), list)
            else None,
        )


@dataclass(frozen=True)
class Totals:
    requests: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    rps_10s: float | None = None
    tps_10s: float | None = None
    running: int | None = None
    queued: int | None = None

    @classmethod
    def read(cls, raw: Any) -> Totals:
        d = obj(raw)
        return cls(
            integer(d.get("requests")),
            integer(d.get("prompt_tokens")),
            integer(d.get("completion_tokens")),
            number(d.get("rps_10s")),
            number(d.get("tps_10s")),
            integer(d.get("running")),
            integer(d.get("queued")),
        )


@dataclass(frozen=True)
class BatchJob:
    id: str
    tenant: str
    status: str
    total: int
    completed: int
    failed: int

    @classmethod
    def read(cls, raw: Any) -> BatchJob | None:
        d = obj(raw)
        if not (batch_id := text(d.get("id"))):
            return None
        return cls(
            batch_id,
            text(d.get("tenant")) or "",
            text(d.get("status")) or "",
            integer(d.get("total")) or 0,
            integer(d.get("completed")) or 0,
            integer(d.get("failed")) or 0,
        )


@dataclass(frozen=True)
class Batches:
    """`status.batches`: the background band and the batch jobs not yet ended."""

    places: int | None = None
    running: int = 0
    queued: int = 0
    share: float | None = None
    active: int = 0
    jobs: tuple[BatchJob, ...] = ()

    @classmethod
    def read(cls, raw: Any) -> Batches:
        d = obj(raw)
        band = obj(d.get("band"))
        jobs = tuple(job for item in items(d.get("jobs")) if (job := BatchJob.read(item)) is not None)
        return cls(
            integer(band.get("places")),
            integer(band.get("running")) or 0,
            integer(band.get("queued")) or 0,
            number(band.get("share")),
            integer(d.get("active")) or len(jobs),
            jobs,
        )

    @property
    def busy(self) -> bool:
        return bool(self.jobs or self.running or self.queued)


@dataclass(frozen=True)
class Status:
    """`GET /admin/status`."""

    state: str | None = None
    ready: bool | None = None
    reason: str | None = None
    engine: str | None = None
    engine_reason: str | None = None
    engine_fallback: str | None = None
    """Under `engine = "auto"` with llama.cpp serving: why not vLLM, with the fix."""
    model: str | None = None
    api_url: str | None = None
    version: str | None = None
    pid: int | None = None
    uptime_s: float | None = None
    engine_stats: EngineStats | None = None
    adapters: dict[str, int] = field(default_factory=dict)
    device: Device = field(default_factory=Device)
    totals: Totals = field(default_factory=Totals)
    batches: Batches = field(default_factory=Batches)

    @classmethod
    def read(cls, raw: Any) -> Status:
        d = obj(raw)
        return cls(
            text(d.get("state")),
            flag(d.get("ready")),
            text(d.get("reason")),
            text(d.get("engine")),
            text(d.get("engine_reason")),
            text(d.get("engine_fallback")),
            text(d.get("model")),
            text(d.get("api_url")),
            text(d.get("version")),
            integer(d.get("pid")),
            number(d.get("uptime_s")),
            EngineStats.read(d.get("engine_stats")),
            counts(d.get("adapters")) or {},
            Device.read(d.get("device")),
            Totals.read(d.get("totals")),
            Batches.read(d.get("batches")),
        )


@dataclass(frozen=True)
class Canary:
    version: str
    percent: float

    @classmethod
    def read(cls, raw: Any) -> Canary | None:
        d = obj(raw)
        version, percent = text(d.get("version")), number(d.get("percent"))
        return cls(version, percent) if version and percent else None


@dataclass(frozen=True)
class Quota:
    used_tokens: int | None = None
    limit_tokens: int | None = None
    used_pct: float | None = None
    period_start: str | None = None

    @classmethod
    def read(cls, raw: Any) -> Quota | None:
        if not isinstance(raw, dict):
            return None
        return cls(
            integer(raw.get("used_tokens")),
            integer(raw.get("limit_tokens")),
            number(raw.get("used_pct")),
            text(raw.get("period_start")),
        )


@dataclass(frozen=True)
class TenantStats:
    requests: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    errors: dict[str, int] | None = None
    """Responses with status >= 500, by status."""
    client_errors: dict[str, int] | None = None
    """4xx responses other than 429, by status."""
    rejected: int | None = None
    queued: int | None = None
    running: int | None = None
    ttft_ms: Percentiles = field(default_factory=Percentiles)
    e2e_ms: Percentiles = field(default_factory=Percentiles)
    rps_10s: float | None = None
    rps_60s: float | None = None
    tps_10s: float | None = None
    tps_60s: float | None = None
    history_interval_s: float | None = None
    history_rps: tuple[float, ...] = ()
    history_tps: tuple[float, ...] = ()
    background_queued: int | None = None
    """Batch lines and flex requests waiting in the background band (not in `queued`)."""
    background_running: int | None = None
    """Batch lines and flex requests running (not in `running`)."""

    @classmethod
    def read(cls, raw: Any) -> TenantStats:
        d = obj(raw)
        history = obj(d.get("history"))
        return cls(
            integer(d.get("requests")),
            integer(d.get("prompt_tokens")),
            integer(d.get("completion_tokens")),
            counts(d.get("errors")),
            counts(d.get("client_errors")),
            integer(d.get("rejected")),
            integer(d.get("queued")),
            integer(d.get("running")),
            Percentiles.read(d.get("ttft_ms")),
            Percentiles.read(d.get("e2e_ms")),
            number(d.get("rps_10s")),
            number(d.get("rps_60s")),
            number(d.get("tps_10s")),
            number(d.get("tps_60s")),
            number(history.get("interval_s")),
            numbers(history.get("rps")),
            numbers(history.get("tps")),
            integer(d.get("background_queued")),
            integer(d.get("background_running")),
        )

    @property
    def server_errors(self) -> int | None:
        return sum(self.errors.values()) if self.errors is not None else None

    @property
    def client_error_count(self) -> int | None:
        return sum(self.client_errors.values()) if self.client_errors is not None else None


@dataclass(frozen=True)
class Tenant:
    """One row of `GET /admin/tenants`."""

    name: str
    disabled: bool | None = None
    allow_base_model: bool | None = None
    active_version: str | None = None
    pinned_version: str | None = None
    canary: Canary | None = None
    keep_resident: bool | None = None
    tier: str | None = None
    policy: tuple[tuple[str, Any], ...] = ()
    quota: Quota | None = None
    stats: TenantStats = field(default_factory=TenantStats)

    @classmethod
    def read(cls, raw: Any) -> Tenant | None:
        d = obj(raw)
        name = text(d.get("name"))
        if not name:
            return None
        policy = tuple(
            (str(k), v)
            for k, v in obj(d.get("policy")).items()
            if v is None or isinstance(v, str | int | float)
        )
        return cls(
            name,
            flag(d.get("disabled")),
            flag(d.get("allow_base_model")),
            text(d.get("active_version")),
            text(d.get("pinned_version")),
            Canary.read(d.get("canary")),
            flag(d.get("keep_resident")),
            text(d.get("tier")),
            policy,
            Quota.read(d.get("quota")),
            TenantStats.read(d.get("stats")),
        )


def tenants(raw: Any) -> list[Tenant]:
    """`{"tenants": [...]}`; rows without a name, and repeated names, are left out."""
    seen: dict[str, Tenant] = {}
    for row in items(obj(raw).get("tenants")):
        tenant = Tenant.read(row)
        if tenant is not None and tenant.name not in seen:
            seen[tenant.name] = tenant
    return list(seen.values())


@dataclass(frozen=True)
class Version:
    version: str
    state: str | None = None
    reason: str | None = None
    active: bool | None = None
    canary_percent: float | None = None
    rank: int | None = None
    size_bytes: float | None = None
    tier: str | None = None
    pinned: bool | None = None
    requests: int | None = None
    errors: int | None = None
    ttft_ms: Percentiles = field(default_factory=Percentiles)
    e2e_ms: Percentiles = field(default_factory=Percentiles)
    note: str | None = None  # it serves (or is held) although trained on another base

    @classmethod
    def read(cls, raw: Any) -> Version | None:
        d = obj(raw)
        version = text(d.get("version"))
        if not version:
            return None
        return cls(
            version,
            text(d.get("state")),
            text(d.get("reason")),
            flag(d.get("active")),
            number(d.get("canary_percent")),
            integer(d.get("rank")),
            number(d.get("size_bytes")),
            text(d.get("tier")),
            flag(d.get("pinned")),
            integer(d.get("requests")),
            integer(d.get("errors")),
            Percentiles.read(d.get("ttft_ms")),
            Percentiles.read(d.get("e2e_ms")),
            text(d.get("note")),
        )


@dataclass(frozen=True)
class Key:
    key_id: str
    created_at: str | None = None
    revoked_at: str | None = None

    @classmethod
    def read(cls, raw: Any) -> Key | None:
        d = obj(raw)
        key_id = text(d.get("key_id"))
        return cls(key_id, text(d.get("created_at")), text(d.get("revoked_at"))) if key_id else None


@dataclass(frozen=True)
class RecentRequest:
    ts: str | None = None
    model: str | None = None
    adapter_version: str | None = None
    endpoint: str | None = None
    status: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    latency_ms: float | None = None
    finish_reason: str | None = None

    @classmethod
    def read(cls, raw: Any) -> RecentRequest:
        d = obj(raw)
        return cls(
            text(d.get("ts")),
            text(d.get("model")),
            text(d.get("adapter_version")),
            text(d.get("endpoint")),
            integer(d.get("status")),
            integer(d.get("prompt_tokens")),
            integer(d.get("completion_tokens")),
            number(d.get("ttft_ms")),
            number(d.get("latency_ms")),
            text(d.get("finish_reason")),
        )


@dataclass(frozen=True)
class TenantDetail:
    """`GET /admin/tenants/{tenant}`: the row plus versions, keys and recent requests."""

    tenant: Tenant
    versions: tuple[Version, ...] = ()
    keys: tuple[Key, ...] = ()
    recent: tuple[RecentRequest, ...] = ()

    @classmethod
    def read(cls, raw: Any, name: str) -> TenantDetail:
        d = obj(raw)
        return cls(
            Tenant.read(d) or Tenant(name),
            tuple(v for v in (Version.read(r) for r in items(d.get("versions"))) if v),
            tuple(k for k in (Key.read(r) for r in items(d.get("keys"))) if k),
            tuple(RecentRequest.read(r) for r in items(d.get("recent"))),
        )


@dataclass(frozen=True)
class Event:
    id: int | None
    ts: str | None
    kind: str
    tenant: str | None
    version: str | None
    detail: str | None

    @classmethod
    def read(cls, raw: Any) -> Event | None:
        d = obj(raw)
        kind = text(d.get("kind"))
        if not kind:
            return None
        return cls(
            integer(d.get("id")),
            text(d.get("ts")),
            kind,
            text(d.get("tenant")),
            text(d.get("version")),
            text(d.get("detail")),
        )


def events(raw: Any) -> list[Event]:
    """`{"events": [...]}` (newest first) as oldest first."""
    read = (Event.read(r) for r in items(obj(raw).get("events")))
    return [e for e in read if e is not None][::-1]
