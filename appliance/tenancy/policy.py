"""What a tenant may do: its policy, the checks on every value, and the daemon's cached view.

A tenant's policy is the config file's `[tenant_defaults]` with the tenant's own values on top
(`lorabox tenant set`, `POST /admin/tenants/<tenant>/policy`). The store keeps only the tenant's
own values, as a JSON object: a field that is absent follows the default, a field set to null
has no limit. Every value from outside (CLI, admin API, config) goes through `parse_value`,
which refuses what is negative, huge, not a number or not finite, naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from ..errors import PolicyError

QUOTA_PERIODS = ("day", "week", "month")
QUOTA_ACTIONS = ("reject", "throttle")
PATTERN_FIELDS = ("deny_input", "deny_output")
"""Guardrail pattern lists (serving/guardrails.py checks them)."""
MAX_SYSTEM_PROMPT_CHARS = 32_768
"""A longer system prompt is refused when it is set: it is sent before every chat request of the
tenant, so it costs every request its tokens (and its share of the context length)."""


@dataclass(frozen=True)
class Policy:
    """One tenant's effective policy. None means "no limit"."""

    weight: float = 1.0
    """Share of the engine when tenants compete: twice the weight, twice the tokens served."""

    rpm: int | None = None
    """Requests per minute (a bucket of `rpm` requests, refilled continuously)."""

    tpm: int | None = None
    """Tokens per minute: prompt + max_tokens reserved when a request is admitted, settled to
    prompt + completion tokens when it ends."""

    max_concurrent: int | None = None
    """Requests of this tenant running in the engine at once; more wait in its queue."""

    max_queued: int = 32
    """Requests of this tenant waiting for the engine at most; more get 429. Never unlimited."""

    quota_tokens: int | None = None
    """Tokens (prompt + completion) per quota period; a request that could cross it is refused."""

    quota_period: str = "month"
    """`day`, `week` (from Monday) or `month`, in UTC."""

    quota_warn_pct: float = 80.0
    """Share of the quota past which responses carry a warning header (and one event per period)."""

    quota_action: str = "reject"
    """What a request that would take the tenant past its quota gets: `reject` refuses it (429
    insufficient_quota); `throttle` serves it at `throttle_rpm` / `throttle_tpm` and the lowest
    fair-share weight, up to `quota_hard_pct` of the quota."""

    throttle_rpm: int | None = 10
    """Requests per minute past the quota, with `quota_action = "throttle"` (or the tenant's `rpm`,
    when lower)."""

    throttle_tpm: int | None = 10_000
    """Tokens per minute past the quota, with `quota_action = "throttle"` (or the tenant's `tpm`,
    when lower)."""

    quota_hard_pct: float | None = 150.0
    """With `quota_action = "throttle"`: the share of the quota past which requests are refused
    (429 insufficient_quota) all the same; none: throttled without end."""

    max_tokens: int | None = None
    """Completion tokens per request at most: the default when a request names none; a request
    asking for more is refused (400)."""

    max_n: int = 4
    """Choices per request (`n`) at most; a request asking for more is refused (400). Each choice
    is generated, and counted, like a request of its own."""

    system_prompt: str = ""
    """Sent as the first system message of every chat request ("": none)."""

    price_in: float = 0.0
    """Price per million prompt tokens, for `lorabox usage`."""

    price_out: float = 0.0
    """Price per million completion tokens, for `lorabox usage`."""

    price_batch_in: float | None = None
    """Price per million prompt tokens of batch jobs' lines (`/v1/batches`); none: half of
    `price_in`, as OpenAI's Batch API discount."""

    price_batch_out: float | None = None
    """Price per million completion tokens of batch jobs' lines; none: half of `price_out`."""

    deny_input: tuple[str, ...] = ()
    """Patterns (RE2 syntax: linear time) that a request's messages or prompt must not match; a
    request that does is refused (400 `content_policy_violation`), naming no pattern."""

    deny_output: tuple[str, ...] = ()
    """Patterns the generated text must not match: it is cut where a match would begin, and ends
    with finish_reason `content_filter`. A match may span at most 256 characters."""

    redact_output: tuple[str, ...] = ()
    """Built-in detectors whose matches in the generated text become `[redacted]`: `email`,
    `phone`, `card` (payment card numbers, Luhn-checked)."""

    retention_days: int | None = None
    """Days the tenant's usage rows are kept (at least 31: the quota's month); older ones are
    deleted by a daily job after their totals are kept as monthly summaries. None: kept for good."""

    file_max_bytes: int = 200 << 20
    """Bytes of one uploaded file (`POST /v1/files`) at most; a larger upload is refused (413) as
    it streams in. Never unlimited. Default 200 MiB, as OpenAI's batch input files."""

    files_total_bytes: int = 2 << 30
    """Bytes of all of the tenant's stored files together at most (uploads in progress count);
    an upload that would cross it is refused (413). Never unlimited."""

    batch_max_lines: int = 50_000
    """Lines (requests) of one batch input file at most; a file with more is refused when it is
    uploaded (400). Never unlimited. Default 50,000, as OpenAI's."""

    def prices(self, tier: str) -> tuple[float, float]:
        """(in, out) per million tokens for requests of `tier`: `default`, or `batch` and `flex`
        (the background band's tiers) at the batch prices."""
        if tier not in ("batch", "flex"):
            return self.price_in, self.price_out
        batch_in = self.price_batch_in if self.price_batch_in is not None else self.price_in / 2
        batch_out = self.price_batch_out if self.price_batch_out is not None else self.price_out / 2
        return batch_in, batch_out

    def view(self) -> dict[str, Any]:
        """As the admin API shows it: the system prompt only as whether there is one."""
        return dataclasses.asdict(self) | {"system_prompt": bool(self.system_prompt)}


FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


@dataclass(frozen=True)
class _Range:
    kind: type
    low: float
    high: float
    unlimited: bool  # may be None ("none": no limit)


_RANGES = {
    "weight": _Range(float, 0.01, 1000, False),
    "rpm": _Range(int, 1, 1_000_000, True),
    "tpm": _Range(int, 1, 1_000_000_000, True),
    "max_concurrent": _Range(int, 1, 100_000, True),
    "max_queued": _Range(int, 0, 100_000, False),
    "quota_tokens": _Range(int, 1, 10**15, True),
    "quota_warn_pct": _Range(float, 1, 100, False),
    "throttle_rpm": _Range(int, 1, 1_000_000, True),
    "throttle_tpm": _Range(int, 1, 1_000_000_000, True),
    "quota_hard_pct": _Range(float, 100, 100_000, True),
    "max_tokens": _Range(int, 1, 10_000_000, True),
    "max_n": _Range(int, 1, 128, False),
    "price_in": _Range(float, 0, 1_000_000, False),
    "price_out": _Range(float, 0, 1_000_000, False),
    "price_batch_in": _Range(float, 0, 1_000_000, True),
    "price_batch_out": _Range(float, 0, 1_000_000, True),
    "retention_days": _Range(int, 31, 365_000, True),
    "file_max_bytes": _Range(int, 1, 1 << 40, False),
    "files_total_bytes": _Range(int, 1, 1 << 44, False),
    "batch_max_lines": _Range(int, 1, 10_000_000, False),
}


def _number(field: str, spec: _Range, raw: Any) -> int | float:
    if isinstance(raw, str):
        text = raw.strip()
        try:
            if not text.isascii():  # int() and float() read other scripts' digits too ("١٢٣")
                raise ValueError(text)
            raw = int(text) if spec.kind is int else float(text)
        except ValueError:
            kind = "a whole number" if spec.kind is int else "a number"
            extra = ' or "none"' if spec.unlimited else ""
            raise PolicyError(field, f"must be {kind}{extra}, not {text[:40]!r}") from None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise PolicyError(field, f"must be a number, not {type(raw).__name__}")
    if isinstance(raw, float) and not math.isfinite(raw):
        raise PolicyError(field, f"must be a finite number, not {raw}")
    if spec.kind is int and isinstance(raw, float):
        if not raw.is_integer():
            raise PolicyError(field, f"must be a whole number, not {raw}")
        raw = int(raw)
    if not spec.low <= raw <= spec.high:
        low, high = (int(spec.low), int(spec.high)) if spec.kind is int else (spec.low, spec.high)
        raise PolicyError(field, f"must be between {low} and {high}, not {raw}")
    return spec.kind(raw)  # type: ignore[no-any-return]


def parse_value(field: str, raw: Any) -> Any:
    """A checked value for `field` from the CLI (a string), JSON or TOML. "none" or None: no limit."""
    check_fields([field])
    unlimited = raw is None or (isinstance(raw, str) and raw.strip().lower() == "none")
    if field == "system_prompt":
        if unlimited:
            return ""
        if not isinstance(raw, str):
            raise PolicyError(field, "must be text")
        if len(raw) > MAX_SYSTEM_PROMPT_CHARS:
            raise PolicyError(field, f"at most {MAX_SYSTEM_PROMPT_CHARS} characters, not {len(raw)}")
        try:
            raw.encode()
        except UnicodeEncodeError:
            raise PolicyError(field, "is not valid Unicode (an unpaired surrogate)") from None
        return raw
    if field in PATTERN_FIELDS or field == "redact_output":
        # Imported here: the config's example runs on the standard library alone (install.sh).
        from ..serving.guardrails import check_detectors, check_patterns

        return (check_patterns if field in PATTERN_FIELDS else check_detectors)(field, raw)
    choices = {"quota_period": QUOTA_PERIODS, "quota_action": QUOTA_ACTIONS}.get(field)
    if choices is not None:
        if raw not in choices:
            raise PolicyError(field, f"must be one of {', '.join(choices)}, not {str(raw)[:40]!r}")
        return raw
    spec = _RANGES[field]
    if unlimited:
        if not spec.unlimited:
            raise PolicyError(field, "cannot be unlimited")
        return None
    return _number(field, spec, raw)


def parse_values(values: dict[str, Any]) -> dict[str, Any]:
    return {field: parse_value(field, raw) for field, raw in values.items()}


def check_fields(fields: list[str] | tuple[str, ...]) -> None:
    for field in fields:
        if field not in FIELDS:
            raise PolicyError(field, f"no such policy field (known: {', '.join(FIELDS)})")


def effective(defaults: Policy, own: dict[str, Any]) -> Policy:
    """The defaults with a tenant's own values on top (values already checked)."""
    # Lists (as JSON keeps them) become the tuples a Policy holds.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in own.items() if k in FIELDS}
    return dataclasses.replace(defaults, **values)  # type: ignore[arg-type]


def describe(field: str, value: Any) -> str:
    """A value as the CLI and the audit log show it; a system prompt only by size and digest."""
    if field == "system_prompt":
        if not value:
            return "(none)"
        digest = hashlib.sha256(value.encode()).hexdigest()[:12]
        return f"{len(value)} characters, sha256 {digest}"
    if isinstance(value, list | tuple):
        shown = json.dumps(list(value), ensure_ascii=False)
        if len(shown) <= 120:
            return shown
        return f"{len(value)} entries, sha256 {hashlib.sha256(shown.encode()).hexdigest()[:12]}"
    return "none" if value is None else str(value)
