"""Settings: a TOML file, then `LORABOX_<FIELD>` environment overrides, typed and checked.

The service reads /etc/lorabox/lorabox.toml; `--config` or LORABOX_CONFIG names another file.
Every field below carries its own documentation; `lorabox config` prints the effective values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from ..errors import ConfigError, PolicyError
from ..serving.tools import SETTINGS as TOOL_PARSERS
from ..tenancy.policy import Policy, parse_values

DEFAULT_CONFIG_PATH = Path("/etc/lorabox/lorabox.toml")
ENV_PREFIX = "LORABOX_"
ENGINES = ("auto", "vllm", "llamacpp")

SHUTDOWN_MARGIN_S = 20.0
"""What stopping takes at most after the drain: cut streams' last events (2 s), the last usage
write (it waits for no lock: what the database does not take goes to the spool), aiohttp closing
connections (2 x 1 s) and the engine core's exit (5 s, then it is killed), with room to spare.
See `Settings.stop_timeout_s`."""
LOG_LEVELS = ("debug", "info", "warning", "error")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULERS = ("fair", "fifo")
LIMITS_FAIL_MODES = ("open", "closed")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
BOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
COMMIT_MODES = ("fsync", "commit", "async")  # the usage ledger's durability, `usage_commit`
DEFAULTS_SECTION = "tenant_defaults"
DEFAULTS_ENV_PREFIX = ENV_PREFIX + "DEFAULT_"
MAX_REQUEST_BYTES = 2 << 20
MAX_LORA_RANK = 512  # vLLM's largest
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class InvalidSetting(ConfigError):
    """One setting's value is wrong; `load_config` adds where the value came from."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name


@dataclass(frozen=True)
class Settings:
    model: str = ""
    """Base model: a local directory in Hugging Face format, or a Hugging Face id (`org/name`),
    downloaded once into <state_dir>/models (`lorabox model fetch`, else at the first start).
    Empty: the built-in demo model."""

    served_model_name: str = ""
    """Name clients use for the base model (`model` field). Empty: the model directory's name."""

    tool_parser: str = "auto"
    """How the model writes tool calls, for `tools` in chat requests: `hermes` (<tool_call> JSON:
    Qwen2.5, Hermes, the demo), `llama3_json` (Llama 3.1/3.2), `mistral` ([TOOL_CALLS]), `none`
    (requests with tools are refused), or `auto`: the one the model's chat template writes."""

    engine: str = "auto"
    """`auto` (vLLM, else llama.cpp), `vllm` or `llamacpp`."""

    adapters_dir: Path = Path("/var/lib/lorabox/adapters")
    """The drop folder: `<adapters_dir>/<tenant>/<version>/` holds one PEFT LoRA adapter."""

    state_dir: Path = Path("/var/lib/lorabox")
    """Where the SQLite database and runtime files live. Must be writable by the service."""

    admin_socket: Path | None = None
    """Unix socket of the admin API (CLI, TUI); mode 0660. Default: <state_dir>/admin.sock."""

    host: str = "127.0.0.1"
    """Address the OpenAI-compatible API listens on. Keep it on loopback behind a proxy."""

    port: int = 8400
    """TCP port of the OpenAI-compatible API."""

    metrics_listen: str = "127.0.0.1:8401"
    """`host:port` of the Prometheus listener (`GET /metrics`), apart from the API: its metrics name
    every tenant, so keep it where only the operator's Prometheus reaches it. Empty: no listener."""

    metrics_on_api_port: bool = False
    """Also serve `/metrics` on the API port (without a key, like any Prometheus target). Off: it
    is 404 there. Only where no tenant can reach the API port: the metrics name every tenant, its
    traffic and its adapter versions."""

    max_request_bytes: int = 1 << 20
    """Largest accepted request body; larger bodies get 413 before they are read. At most 2 MiB:
    a body is parsed on the event loop, which takes up to about 15 ms per MiB."""

    request_header_timeout_s: float = 10.0
    """Seconds a client has to send a request's line and headers, from connecting (or from the
    first byte of its next request on a kept-alive connection); a slower one gets 408 and is
    disconnected. Behind nginx the headers arrive at once."""

    request_body_timeout_s: float = 30.0
    """Seconds a client has to send a request's whole body once its headers are in; a slower one
    gets 408 and is disconnected. 30 s carries a 1 MiB body at 35 KB/s; behind nginx (which buffers
    bodies before passing them on) the body arrives at once."""

    max_connections: int = 1024
    """Open connections to the OpenAI API at most. A new connection past it closes the connection
    that has waited longest on its client (idle, or slow to send its request); when every open
    connection has a request in progress, the new one gets 503. The daemon raises its open-file
    limit to fit, or lowers this to fit the limit, keeping descriptors for its own files."""

    dtype: str = "auto"
    """Weights and activations dtype for the engine (`auto`, `float32`, `bfloat16`, `float16`).
    llama.cpp: `float32` also keeps its KV cache in f32 (needed for exact parity with an fp32
    reference), and a model it converts itself is written as f32 for `float32`, else as f16."""

    max_model_len: int = 0
    """Context length (prompt + completion) per request. 0: the model's own (config.json), capped
    so that one sequence's KV cache fits in what the engine may use (cpu_kv_cache_gib on a CPU box;
    on a GPU, the VRAM vLLM may use less the weights). More than the model's own is refused at start."""

    max_loras: int = 0
    """Adapter slots on the GPU (vLLM `max_loras`: adapters per batch). 0: planned at start from
    the adapters registered and the memory budget, so every active adapter stays resident."""

    max_cpu_loras: int = 0
    """Adapters kept in host memory, ready to swap into a GPU slot. 0: planned at start."""

    lora_cpu_budget_mib: int = 256
    """Memory for adapter slots on CPU-only boxes (on a GPU the planner measures free VRAM)."""

    max_lora_rank: int = 64
    """Largest adapter rank the engine accepts; larger ranks are refused at registration."""

    strict_base_match: bool = False
    """Hold an adapter whose base_model_name_or_path names another model than the served base (its
    shapes fitting) until `lorabox adapters accept <tenant> <version>`. Off: such adapters serve,
    flagged in `lorabox adapters list`, the events and `lorabox doctor` (QLoRA adapters name the
    quantised copy they were trained on)."""

    gpu_memory_utilization: float = 0.90
    """Fraction of GPU memory vLLM may use for weights, adapters and KV cache."""

    tensor_parallel_size: int = 1
    """GPUs of this box that vLLM splits the model across (tensor parallelism; alike GPUs, a power
    of two that divides the model's attention heads). 1: one GPU. llama.cpp spreads its layers over
    every visible GPU by itself. See docs/scaling.md."""

    cpu_kv_cache_gib: int = 4
    """KV cache size on CPU-only boxes (vLLM's VLLM_CPU_KVCACHE_SPACE)."""

    gguf_model: Path | None = None
    """The llama.cpp engine's base model: a GGUF file of `model` (quantised is fine). Empty: `model`
    converted to GGUF on first start and kept in <state_dir>/gguf. Adapters are converted against it."""

    llamacpp_parallel: int = 4
    """Requests the llama.cpp engine decodes at once, each with max_model_len tokens of KV cache;
    more wait for a free one."""

    llamacpp_threads: int = 0
    """CPU threads for llama.cpp. 0: one per physical core, less one (the daemon's), at least one
    (engines/llamacpp.py, `default_threads`, says why)."""

    log_level: str = "info"
    """`debug`, `info`, `warning` or `error`."""

    drain_timeout_s: float = 30.0
    """On SIGTERM, how long requests in flight may run on (new ones get 503 and /readyz says
    "stopping"). At the deadline each one still running ends: a stream with an error event
    (`server_shutting_down`) and `[DONE]`, booked in the usage ledger as 503 with the tokens it
    got. systemd's TimeoutStopSec must be at least `drain_timeout_s` + 20 s (lorabox.service: 50
    for the default); lorabox asks systemd for that much when it stops, in case it is longer."""

    engine_probe_interval_s: float = 5.0
    """How often the daemon checks that the engine still answers (a round trip through its work
    loop that generates nothing). A dead engine process is noticed at once, without a probe."""

    engine_probe_timeout_s: float = 20.0
    """A probe unanswered this long means the engine hangs: every request in flight ends with an
    error (`engine_failed`, 503) and the daemon exits non-zero, for systemd to restart it. Long
    enough for the slowest single engine step (a huge prefill, loading a large adapter). Only the
    time the daemon's own event loop could run counts: a daemon starved of CPU does not blame its
    engine. Longer than `engine_probe_interval_s`; the systemd watchdog pings stop once no probe
    has been answered for this long."""

    start_timeout_s: float = 1800.0
    """How long start-up may take in all: downloading the model (first start, with a Hugging Face
    id), loading it and warming every tenant's adapter. Meanwhile lorabox asks systemd for more
    time every 10 s (EXTEND_TIMEOUT_USEC), so the unit's TimeoutStartSec only covers the seconds
    before it first speaks; past this, systemd stops the service as failed to start."""

    scheduler: str = "fair"
    """Which waiting request the engine gets next. `fair`: weighted fair across tenants (virtual
    token counters, as VTC: a tenant's tokens served, prompt + 2 x completion, over its weight;
    the lowest goes first, and a tenant below its share of the places starts at once). `fifo`: in
    order of arrival, whoever sent it (for comparison; see benchmarks/noisy_neighbour.py)."""

    max_running: int = 0
    """Generation requests in the engine at once; the rest wait in lorabox's fair queue. 0: as many
    as the engine batches (vLLM's max_num_seqs, `llamacpp_parallel`), so the engine is kept just
    saturated and fairness decides who waits when it is full; a larger value is lowered to that.
    The knob between latency isolation and throughput: lower keeps batches small (each token comes
    sooner, a tenant can get ahead of its share by fewer tokens: README, "Fair scheduling") at the
    cost of tokens per second in all. A tenant holding fewer places than its share (`max_running` x
    its weight / the active tenants' weights) starts its next request at once even when all places
    are taken."""

    max_queued: int = 1024
    """Requests waiting for the engine, all tenants together, at most; past it new requests get 503
    with Retry-After. Each tenant's own bound is its policy's `max_queued`."""

    usage_commit: str = "commit"
    """When a request's usage-ledger row is safe, and what its response waits for. `commit`: the row
    is committed (or spooled, see `usage_spool_dir`) before the response's last byte and fsynced
    every second (a crash or kill -9 of the daemon loses no row of a finished response; a power cut
    at most the last second's). `fsync`: also fsynced before the last byte (nothing lost to a power
    cut; each response waits for the disk). `async`: rows are written every second, after the
    responses (a crash loses up to a second's). Rows are written in groups on a thread of their
    own: the event loop never waits on the disk, nor on a lock another program holds."""

    usage_spool_dir: Path | None = None
    """Where usage rows go when the database cannot take them at once (another program holds its
    write lock, a full disk, an I/O error): append-only files, replayed into the database once it
    takes writes again, each row booked once. On another disk than `state_dir`, a full state disk
    costs nothing; on the same, requests are refused (503) while neither takes rows. Empty:
    <state_dir>/spool."""

    exports_dir: Path | None = None
    """Where `POST /admin/tenants/<tenant>/export` writes (a file name in it, never a path); mode
    0750, files 0640. Empty: <state_dir>/exports."""

    limits_backend: str = "local"
    """Where rate limits and quotas are counted. `local`: on this box alone. A Redis URL
    (`redis://host:6379/0`, `rediss://` for TLS, `unix:///run/redis.sock`): in Redis, shared by every
    box that names it, so a tenant's limits and quota hold across boxes behind round-robin (one
    Redis database per fleet; docs/scaling.md). Key revocations reach every such box within 2 s."""

    limits_fail_mode: str = "open"
    """What a box does while Redis (`limits_backend`) does not answer: `open` counts on this box alone
    (a tenant may get up to its limits on each box, and the quota what the others had used when last
    heard of), `closed` refuses requests with 503. Either way one line in the log, /readyz and
    `lorabox status` say so until Redis answers again."""

    box_id: str = ""
    """This box's name in the usage ledger (every row carries it) and in the shared counters. Empty:
    made once from the host name and a random part, and kept in the state database."""

    batch_max_running: int = 0
    """Places of the fair queue's background band: batch lines (OpenAI's Batch API, `/v1/batches`)
    running at once at most, over all tenants, and only in places interactive requests leave
    (tenancy/scheduler.py). 0: half of the engine's places (`max_running`, or the engine's batch
    size), at least 1."""

    tenant_defaults: Policy = field(default_factory=Policy)
    """The policy of every tenant that has not set its own value (`[tenant_defaults]` in the file;
    `LORABOX_DEFAULT_<FIELD>` in the environment): weight, rpm, tpm, max_concurrent, max_queued,
    quota_tokens, quota_period, quota_warn_pct, quota_action, throttle_rpm, throttle_tpm, quota_hard_pct,
    max_tokens, max_n, system_prompt, price_in, price_out, price_batch_in, price_batch_out,
    file_max_bytes, files_total_bytes,
    batch_max_lines (tenancy/policy.py documents each; "none" is no limit). Unset: no limits, weight 1,
    32 queued, a quota refuses at 100% (quota_action "reject"), files as OpenAI's (200 MiB a file,
    50,000 lines), 2 GiB of files a tenant."""

    telemetry: bool = True
    """Count every request per tenant and adapter version (/metrics, the admin API, `lorabox tui`)
    and read vLLM's scheduler stats. Off only to measure what it costs: the counts then stay 0."""

    source: Path | None = field(default=None, compare=False)
    """The file these settings were read from, if any (not a setting)."""

    @property
    def database_path(self) -> Path:
        return self.state_dir / "lorabox.db"

    @property
    def stop_timeout_s(self) -> float:
        """The longest a stop takes: the drain, then SHUTDOWN_MARGIN_S for the rest."""
        return self.drain_timeout_s + SHUTDOWN_MARGIN_S

    @property
    def gguf_cache_dir(self) -> Path:
        """Converted GGUF files: the base model when gguf_model is empty, and every adapter."""
        return self.state_dir / "gguf"

    @property
    def exports_path(self) -> Path:
        """Where exports requested through the admin API go (`exports_dir`, or its default)."""
        return self.exports_dir or self.state_dir / "exports"

    @property
    def usage_spool_path(self) -> Path:
        return self.usage_spool_dir or self.state_dir / "spool"

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of the metrics listener, or None for none (`metrics_listen` checked)."""
        return _address(self.metrics_listen) if self.metrics_listen else None

    @property
    def shared_limits(self) -> bool:
        """Rate limits and quotas are counted in Redis (`limits_backend`), not on this box alone."""
        return self.limits_backend != "local"

    @property
    def admin_socket_path(self) -> Path:
        return self.admin_socket or self.state_dir / "admin.sock"

    @property
    def base_model_name(self) -> str:
        return self.served_model_name or (Path(self.model).name if self.model else "lorabox-demo")

    def validate(self) -> Settings:
        """Raises InvalidSetting, naming the field, for the first value out of its range."""
        if self.engine not in ENGINES:
            raise InvalidSetting("engine", f"must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.tool_parser not in TOOL_PARSERS:
            raise InvalidSetting(
                "tool_parser", f"must be one of {', '.join(TOOL_PARSERS)}, not {self.tool_parser!r}"
            )
        if not 0 < self.port < 65536:
            raise InvalidSetting("port", f"must be 1-65535, not {self.port}")
        if not 1024 <= self.max_request_bytes <= MAX_REQUEST_BYTES:
            raise InvalidSetting("max_request_bytes", f"must be between 1024 and {MAX_REQUEST_BYTES}")
        for name in ("request_header_timeout_s", "request_body_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidSetting(name, "must be > 0")
        if self.max_connections < 1:
            raise InvalidSetting("max_connections", "must be at least 1")
        for name in ("max_loras", "max_cpu_loras"):
            if getattr(self, name) < 0:
                raise InvalidSetting(name, "must be >= 0 (0 means planned)")
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise InvalidSetting("max_cpu_loras", "need max_cpu_loras >= max_loras")
        if self.lora_cpu_budget_mib < 1:
            raise InvalidSetting("lora_cpu_budget_mib", "must be at least 1")
        if not 1 <= self.max_lora_rank <= MAX_LORA_RANK:
            raise InvalidSetting("max_lora_rank", f"must be 1-{MAX_LORA_RANK}")
        if self.max_model_len < 0:
            raise InvalidSetting("max_model_len", "must be >= 0 (0: the model's own maximum)")
        if self.dtype not in DTYPES:
            raise InvalidSetting("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.log_level not in LOG_LEVELS:
            raise InvalidSetting(
                "log_level", f"must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        if self.tensor_parallel_size < 1:
            raise InvalidSetting("tensor_parallel_size", "must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise InvalidSetting("gpu_memory_utilization", "must be in (0, 1]")
        if self.cpu_kv_cache_gib < 1:
            raise InvalidSetting("cpu_kv_cache_gib", "must be at least 1")
        if self.drain_timeout_s < 0:
            raise InvalidSetting("drain_timeout_s", "must be >= 0")
        for name in ("engine_probe_interval_s", "engine_probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidSetting(name, "must be > 0")
        if self.engine_probe_timeout_s <= self.engine_probe_interval_s:
            # A working engine answers at least once per timeout: the systemd watchdog relies on it.
            raise InvalidSetting("engine_probe_timeout_s", "must be longer than engine_probe_interval_s")
        if self.start_timeout_s <= 0:
            raise InvalidSetting("start_timeout_s", "must be > 0")
        if self.llamacpp_parallel < 1:
            raise InvalidSetting("llamacpp_parallel", "must be >= 1")
        if self.llamacpp_threads < 0:
            raise InvalidSetting("llamacpp_threads", "must be >= 0 (0: one per physical core, less one)")
        if self.metrics_listen:
            try:
                _address(self.metrics_listen)
            except ValueError as exc:
                raise InvalidSetting("metrics_listen", str(exc)) from None
            if self.metrics_address == (self.host, self.port):
                raise InvalidSetting("metrics_listen", "must differ from the API's host and port")
        if self.usage_commit not in COMMIT_MODES:
            raise InvalidSetting(
                "usage_commit", f"must be one of {', '.join(COMMIT_MODES)}, not {self.usage_commit!r}"
            )
        if self.scheduler not in SCHEDULERS:
            raise InvalidSetting(
                "scheduler", f"must be one of {', '.join(SCHEDULERS)}, not {self.scheduler!r}"
            )
        if self.max_running < 0:
            raise InvalidSetting("max_running", "must be >= 0 (0: the engine's batch size)")
        if self.max_queued < 0:
            raise InvalidSetting("max_queued", "must be >= 0")
        if self.batch_max_running < 0:
            raise InvalidSetting("batch_max_running", "must be >= 0 (0: half of the engine's places)")
        if self.limits_backend != "local" and not self.limits_backend.startswith(REDIS_SCHEMES):
            raise InvalidSetting(
                "limits_backend",
                f"must be local or a Redis URL (redis://host:6379/0), not {self.limits_backend!r}",
            )
        if self.limits_fail_mode not in LIMITS_FAIL_MODES:
            raise InvalidSetting(
                "limits_fail_mode",
                f"must be one of {', '.join(LIMITS_FAIL_MODES)}, not {self.limits_fail_mode!r}",
            )
        if self.box_id and not BOX_ID.fullmatch(self.box_id):
            raise InvalidSetting(
                "box_id",
                f"must be 1-63 of A-Z, a-z, 0-9, '.', '_', '-', a letter or digit first; not {self.box_id!r}",
            )
        return self


def _address(text: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port with a port of 1-65535, e.g. 127.0.0.1:8401, not {text!r}")
    return host, int(port)


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """The value as the field's type. TOML gives typed values, the environment strings."""
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return value.strip().lower() in TRUE_WORDS
            raise ValueError(f"not true or false ({', '.join(TRUE_WORDS + FALSE_WORDS)})")
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError("not a number")
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("not a whole number")
            try:
                return kind(value)
            except ValueError:  # a string: Python's own words ("invalid literal for int()") say less
                raise ValueError("not a whole number" if kind is int else "not a number") from None
        if not isinstance(value, str):
            raise ValueError("not a string")
        if kind == Path | None and value == "":
            return None  # `key = ""` in the file means "not set", as for the string settings
        if kind in (Path, Path | None):
            return Path(os.path.expanduser(value))
        if kind is str:
            return value
    except (TypeError, ValueError) as exc:
        raise InvalidSetting(name, f"cannot use {value!r} ({exc})") from exc
    raise InvalidSetting(name, "unsupported setting type")


def setting_names() -> list[str]:
    """Every top-level setting, in declaration order (`source` is not one; the `[tenant_defaults]`
    table is a section of its own)."""
    return [f.name for f in dataclasses.fields(Settings) if f.name not in ("source", DEFAULTS_SECTION)]


def env_origin(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()} (environment)"


def setting_origin(settings: Settings, name: str, env: Mapping[str, str] | None = None) -> str:
    """Where a loaded setting's value came from, as load_config's errors name it: its LORABOX_
    variable, else the file it was read from, else "defaults"."""
    if ENV_PREFIX + name.upper() in (os.environ if env is None else env):
        return env_origin(name)
    return str(settings.source) if settings.source else "defaults"


def load_config(path: Path | str | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read settings from `path` (or LORABOX_CONFIG, or the system file if present) plus env.

    A wrong value raises ConfigError naming the setting and where the value came from: the
    file, or the LORABOX_<NAME> environment variable."""
    env = dict(os.environ if env is None else env)
    explicit = path or env.get(f"{ENV_PREFIX}CONFIG")
    config_path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    values: dict[str, Any] = {}
    if config_path.exists():
        try:
            values = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config_path}: {exc}") from exc
    elif explicit:
        raise ConfigError(f"config file not found: {config_path}")

    defaults = _tenant_defaults(values.pop(DEFAULTS_SECTION, {}), env, config_path)
    names = setting_names()
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"{config_path}: unknown setting(s): {', '.join(sorted(unknown))}")
    origins = dict.fromkeys(values, str(config_path))
    for name in names:
        env_value = env.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
            origins[name] = env_origin(name)
    # A default found wrong in a cross-field check is the file's to fix.
    where = str(config_path) if config_path.exists() else "defaults"
    hints = get_type_hints(Settings)
    try:
        typed = {name: _coerce(name, hints[name], value) for name, value in values.items()}
        return Settings(
            **typed, tenant_defaults=defaults, source=config_path if config_path.exists() else None
        ).validate()
    except InvalidSetting as exc:
        raise ConfigError(f"{origins.get(exc.name, where)}: {exc}") from exc


def _tenant_defaults(section: Any, env: dict[str, str], config_path: Path) -> Policy:
    """The `[tenant_defaults]` table, with LORABOX_DEFAULT_<FIELD> on top, as checked policy values."""
    if not isinstance(section, dict):
        raise ConfigError(f"{config_path}: {DEFAULTS_SECTION} must be a table ([{DEFAULTS_SECTION}])")
    values = dict(section)
    for name, value in env.items():
        if name.startswith(DEFAULTS_ENV_PREFIX):
            values[name.removeprefix(DEFAULTS_ENV_PREFIX).lower()] = value
    try:
        return Policy(**parse_values(values))
    except PolicyError as exc:
        raise ConfigError(f"{config_path}: {DEFAULTS_SECTION}.{exc}") from exc
