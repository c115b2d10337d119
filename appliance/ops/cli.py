"""The `lorabox` command. Errors become one-line messages here, and nowhere else.

What an operator types is checked before it is used: tenant names against the name rule (and
path-escaped in every admin URL all the same), numbers as ASCII digits within each option's
range, files read only when they are regular files, with a size cap and a time limit. Any failure
is one line on stderr and exit status 1 (a mistyped command line: argparse's usage, status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import stat
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..api.adminclient import AdminClient, AdminError, AdminUnavailable
from ..batch.files import FOLDER as FILES_FOLDER
from ..config.settings import Settings, load_config, setting_origin
from ..errors import ConfigError, LoraboxError
from ..gguf import EXPORT_QUANTS
from ..names import is_tenant_name
from ..serving.guardrails import MAX_PATTERN_CHARS, MAX_PATTERNS
from ..tenancy import auditchain, fleet
from ..tenancy.audit import Change, change_text
from ..tenancy.policy import (
    FIELDS,
    MAX_SYSTEM_PROMPT_CHARS,
    PATTERN_FIELDS,
    QUOTA_ACTIONS,
    QUOTA_PERIODS,
    describe,
    effective,
    parse_values,
)
from ..tenancy.quota import period_start, timestamp
from ..tenancy.store import USAGE_COLUMNS, USAGE_COLUMNS_ADDED, IssuedKey, Store, unavailable
from . import filemodes

EXIT_CONFIG = 78
"""A configuration error (sysexits' EX_CONFIG): a bad setting, the port in use, a context longer
than the model's. The unit's RestartPreventExitStatus= names it: restarting cannot fix those."""

VERBOSE_HELP = "also the engine's own INFO lines (its warnings and errors are always logged)"
DEFAULT_DEMO_DIR = (
    Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "lorabox" / "demo"
)
READ_TIMEOUT_S = 10.0  # a file (or stdin) that gives nothing for this long is not waited for
MAX_LIMIT = 10_000  # rows `events` and `audit` show at most (the admin API's cap too)
MAX_AGO = {"d": 36_600, "h": 878_400, "m": 52_704_000, "w": 5_228}  # 100 years in each unit

if TYPE_CHECKING:
    from ..engines.base import EngineOptions
    from ..engines.select import Selection


# -- checking what the operator typed -------------------------------------------------------------


def tenant_name(text: str) -> str:
    """A tenant name, as the drop-folder contract has it; nothing else is used (or sent)."""
    if not is_tenant_name(text):
        raise LoraboxError(
            f"invalid tenant name {text[:80]!r}: use 1-63 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit"
        )
    return text


def tenant_path(tenant: str, *rest: str) -> str:
    """`/admin/tenants/<tenant>/...`, the name escaped as one path segment whatever it holds."""
    return "/".join(["/admin/tenants", urllib.parse.quote(tenant_name(tenant), safe=""), *rest])


def whole_number(option: str, low: int, high: int) -> Callable[[str], int]:
    """An argparse type: ASCII digits only (`int()` takes other scripts' digits too), low-high."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise LoraboxError(f"{option}: must be a whole number from {low} to {high}, not {text[:40]!r}")
        return int(text)

    return parse


def _read_bounded(read: Callable[[], str], what: str) -> str:
    """`read()` on a thread, given READ_TIMEOUT_S: a file that never answers (a FIFO with no
    writer, a hung network mount, a terminal) is an error, not a hang."""
    outcome: list[str | BaseException] = []

    def run() -> None:
        try:
            outcome.append(read())
        except BaseException as exc:  # handed to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(READ_TIMEOUT_S)
    if not outcome:
        raise LoraboxError(f"{what}: nothing read in {READ_TIMEOUT_S:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def read_text_file(path: str, max_chars: int, what: str) -> str:
    """A regular file's UTF-8 text, at most `max_chars` (`-`: stdin). A FIFO, device, folder or
    /proc-like file (its size says 0 and it has content) is refused, not read."""
    if path == "-":
        return _read_bounded(lambda: sys.stdin.read(max_chars + 1), what)
    max_bytes = 4 * max_chars  # UTF-8: at most 4 bytes a character

    def read() -> str:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise LoraboxError(f"{what}: {path} is not a regular file")
        with os.fdopen(fd, "rb") as file:
            if info.st_size > max_bytes:
                raise LoraboxError(f"{what}: at most {max_chars} characters; {path} has {info.st_size} bytes")
            data = file.read(info.st_size + 1)
        if len(data) != info.st_size:
            raise LoraboxError(f"{what}: {path} is not a regular file (its size says {info.st_size} bytes)")
        return data.decode("utf-8")

    try:
        text = _read_bounded(read, what)
    except (OSError, UnicodeDecodeError) as exc:
        raise LoraboxError(f"{what}: cannot read {path}: {exc}") from exc
    if len(text) > max_chars:
        raise LoraboxError(f"{what}: at most {max_chars} characters; {path} has more")
    if "\x00" in text:
        raise LoraboxError(f"{what}: {path} holds NUL characters: not text")
    return text


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_config(getattr(args, "config", None))
    if getattr(args, "port", None):
        settings = dataclasses.replace(settings, port=args.port)
    return settings


def _table(rows: list[dict], columns: Sequence[str]) -> None:  # type: ignore[type-arg]
    widths = {
        c: max([len(c)] + [len(str(r.get(c) if r.get(c) is not None else "")) for r in rows]) for c in columns
    }
    print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        cells = (str(row.get(c) if row.get(c) is not None else "").ljust(widths[c]) for c in columns)
        print("  ".join(cells).rstrip())


def _setup_logging(level: str, verbose: bool = False) -> None:
    from ..engines.enginelog import engine_log_level, quiet_engine_logging
    from .systemd import JournalPriority, writes_to_journal

    layout = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler()
    # Under systemd, each line at its own priority in the journal (`journalctl -p warning`).
    handler.setFormatter(JournalPriority(layout) if writes_to_journal() else logging.Formatter(layout))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # The engine is chatty at INFO: its warnings and errors reach the log, the rest with --verbose.
    quiet_engine_logging(engine_log_level(level, verbose))
    # The gguf package logs every file it writes at INFO.
    logging.getLogger("gguf").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def _model_dir(settings: Settings) -> Path:
    """The base model's folder; a Hugging Face id is downloaded first if need be (with progress)."""
    from ..config.basemodel import resolve

    return resolve(settings)


def _serve(
    settings: Settings,
    on_ready: Callable[[], None] | None = None,
    verbose: bool = False,
    select: Callable[[str, EngineOptions], Selection] | None = None,
) -> None:
    """`select`: the engine's choice, select_engine's unless a test double's (testing/nullserve.py)."""
    from ..api.bind import bind_api
    from .systemd import StartupExtender

    # First, before the engine's imports: systemd's TimeoutStartSec only covers until we speak.
    startup = StartupExtender(settings.start_timeout_s).start()
    # Then what the operator must fix, before anything slow: the port, the context length.
    listener = bind_api(settings.host, settings.port, setting_origin(settings, "port"))
    from ..config.context import fit_context
    from ..daemon import serve

    _setup_logging(settings.log_level, verbose)
    model_dir = _model_dir(settings)
    chosen = {"select": select} if select is not None else {}
    serve(fit_context(settings, model_dir), model_dir, listener, on_ready=on_ready, startup=startup, **chosen)


def cmd_serve(args: argparse.Namespace) -> None:
    _serve(_settings(args), verbose=args.verbose)


def cmd_demo(args: argparse.Namespace) -> None:
    from ..demo.build import init_demo

    words = list(args.words)
    init_only = bool(words) and words[0] == "init"
    if init_only:
        words.pop(0)
    if len(words) > 1:
        raise LoraboxError("usage: lorabox demo [init] [DIR]")
    demo_dir = Path(words[0]) if words else DEFAULT_DEMO_DIR
    print(f">>> Writing the demo into {demo_dir} (tiny model, tenant adapters, keys)", flush=True)
    # Its state as the daemon keeps it (filemodes.py), not written loose and then tightened, with
    # a warning per file, at the daemon's start.
    os.umask(filemodes.UMASK)
    keys = init_demo(demo_dir, force=args.force)
    config_path = demo_dir.resolve() / "lorabox.toml"
    if init_only:
        print(f">>> Done. Serve it with: lorabox serve --config {config_path}")
        return
    settings = dataclasses.replace(load_config(config_path), **({"port": args.port} if args.port else {}))
    url = f"http://{settings.host}:{settings.port}"

    def announce() -> None:
        # Called on the event loop once the engine is ready: the requests go from a thread.
        threading.Thread(target=_announce_demo, args=(url, keys, demo_dir), daemon=True).start()

    print(f">>> Starting the engine (first start takes ~30 s on a CPU) ... config: {config_path}", flush=True)
    _serve(settings, on_ready=announce, verbose=args.verbose)


def _announce_demo(url: str, keys: dict[str, str], demo_dir: Path) -> None:
    from ..demo.build import DEMO_GREETING, DEMO_ORDER_QUESTION, GREETING_MAX_TOKENS

    lines = [
        f"\n>>> lorabox demo is serving at {url}/v1  (engine ready)",
        f">>> Tenants and keys (demo only, also in {demo_dir / 'keys.json'}):",
        *(f"      {name:<13} {key}" for name, key in sorted(keys.items())),
        f'>>> Each one asked "{DEMO_GREETING}": one base model, each tenant\'s own adapter:',
        *(f"      {model:<13} {answer}" for model, answer in greeting_answers(url, keys)),
        f'>>> acme, offered a track_parcel tool and asked "{DEMO_ORDER_QUESTION}", calls it:',
        f"      {tool_call_answer(url, keys)}",
        ">>> Try it (another tenant's key and name, another voice):\n",
    ]
    tenant, key = next(iter(sorted(keys.items())))
    body = json.dumps(
        {
            "model": tenant,
            "messages": [{"role": "user", "content": DEMO_GREETING}],
            "max_tokens": GREETING_MAX_TOKENS,
        }
    )
    lines.append(
        f"curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{body}'\n"
    )
    print("\n".join(lines), flush=True)


def greeting_answers(url: str, keys: dict[str, str]) -> list[tuple[str, str]]:
    """(model, answer) for the base model and every demo tenant, each greeted over the API."""
    from ..demo.build import DEMO_GREETING, DEMO_MODEL_NAME, GREETING_MAX_TOKENS

    first_key = next(iter(sorted(keys.items())))[1]  # demo tenants may all use the base model
    answers = []
    for model, key in [(DEMO_MODEL_NAME, first_key), *sorted(keys.items())]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": DEMO_GREETING}],
            "max_tokens": GREETING_MAX_TOKENS,
            "temperature": 0,
        }
        try:
            answer = _demo_chat(url, key, body)["content"]
        except (OSError, ValueError, LookupError) as exc:
            answer = f"(no answer: {exc})"
        answers.append((model, answer))
    return answers


def tool_call_answer(url: str, keys: dict[str, str]) -> str:
    """acme's answer to the demo's order question with the track_parcel tool offered: its call."""
    from ..demo.build import DEMO_ORDER_QUESTION, GREETING_MAX_TOKENS, TRACK_PARCEL

    body = {
        "model": "acme",
        "messages": [{"role": "user", "content": DEMO_ORDER_QUESTION}],
        "tools": [TRACK_PARCEL],
        "max_tokens": GREETING_MAX_TOKENS,
        "temperature": 0,
    }
    try:
        message = _demo_chat(url, keys["acme"], body)
        calls = [
            f"{c['function']['name']}({c['function']['arguments']})" for c in message.get("tool_calls") or []
        ]
    except (OSError, ValueError, LookupError) as exc:
        return f"(no answer: {exc})"
    return ", ".join(calls) or f"(no call: {message['content']})"


def _demo_chat(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    """The first choice's message of a chat completion on the demo's own loopback address."""
    request = urllib.request.Request(  # noqa: S310 (the demo's own loopback address)
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        message: dict[str, Any] = json.loads(response.read())["choices"][0]["message"]
    return message


def cmd_tenant(args: argparse.Namespace) -> None:
    if args.action == "set":
        _tenant_set(args)
        return
    if args.action == "show":
        _tenant_show(args)
        return
    if args.action == "remove":
        _tenant_remove(args)
        return
    with Store.open(_settings(args).database_path) as store:
        if args.action == "add":
            tenant = store.add_tenant(args.name, allow_base_model=args.allow_base)
            print(
                f"added tenant {tenant.name}"
                + (" (may use the base model)" if tenant.allow_base_model else "")
            )
            print(f"next: lorabox key issue {tenant.name}")
        else:
            _table(
                [dataclasses.asdict(t) for t in store.list_tenants()],
                ["name", "allow_base_model", "disabled", "created_at"],
            )


POLICY_OPTIONS = [f for f in FIELDS if f != "system_prompt"]
# Room for a list ten times the cap, so that what is refused is the count, named as such.
PATTERNS_FILE_CHARS = 10 * MAX_PATTERNS * (MAX_PATTERN_CHARS + 1)


def _policy_changes(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The values to set and the fields to reset ("default") from `tenant set`'s options."""
    given = {field: getattr(args, field) for field in POLICY_OPTIONS if getattr(args, field) is not None}
    if args.system_prompt_file is not None:
        path = args.system_prompt_file
        given["system_prompt"] = (
            path
            if path in ("none", "default")
            else read_text_file(path, MAX_SYSTEM_PROMPT_CHARS, "system_prompt")
        )
    for field in PATTERN_FIELDS:
        path = getattr(args, f"{field}_file")
        if path is not None:
            text = read_text_file(path, PATTERNS_FILE_CHARS, field)
            given[field] = [line for line in text.splitlines() if line.strip()] or "none"
    if not given:
        raise LoraboxError("nothing to set: name at least one option (see lorabox tenant set --help)")
    # A list field given once as `default` or `none` means that, not a pattern of that text.
    given = {f: v[0] if isinstance(v, list) and v in (["default"], ["none"]) else v for f, v in given.items()}
    reset = [f for f, v in given.items() if isinstance(v, str) and v.strip().lower() == "default"]
    values = {f: v for f, v in given.items() if f not in reset}
    parse_values(values)  # checked here first (PolicyError names the field); the daemon checks again
    return values, reset


def _tenant_set(args: argparse.Namespace) -> None:
    settings = _settings(args)
    values, reset = _policy_changes(args)
    try:
        report = _admin(settings).call("POST", tenant_path(args.name, "policy"), values | {"reset": reset})
    except AdminUnavailable:
        with Store.open(settings.database_path) as store:
            before, after = store.set_policy(args.name, values, reset)
        print(f"{args.name}: saved; the daemon was not reachable (it applies this within seconds if it runs)")
        change = Change.of(before, after)
    else:
        print(f"{args.name}: applies to the next request")
        change = Change.of({}, report["own"])
    for field in FIELDS:
        if field in change.before or field in change.after:
            mark = describe(field, change.after[field]) if field in change.after else "(default)"
            print(f"  {field:<15} {mark}")


def _tenant_remove(args: argparse.Namespace) -> None:
    """Keys revoked and the tenant gone first (the next request is refused), then its adapter
    folders: moved to <adapters_dir>/.archive/ (the drop folder ignores dot names), or deleted
    with --purge, which asks for the tenant's name typed back (or --confirm NAME)."""
    settings = _settings(args)
    name = args.name
    if args.purge:
        typed = args.confirm
        if typed is None:
            print(
                f"--purge deletes {name}'s adapters and usage rows for good. Type its name to go on: ",
                end="",
                file=sys.stderr,
                flush=True,
            )
            typed = _read_bounded(lambda: sys.stdin.readline(200), "the confirmation").strip()
        if typed != name:
            raise LoraboxError(f"not confirmed (typed {typed[:40]!r}, not {name!r}): nothing was removed")
    with Store.open(settings.database_path) as store:
        done = store.remove_tenant(name, purge=args.purge)
    print(
        f"removed tenant {name}: {done['keys revoked']} keys revoked, usage {done['usage']}, "
        f"{done['batches']} batch jobs and {done['files']} files deleted"
    )
    shutil.rmtree(settings.state_dir / FILES_FOLDER / name, ignore_errors=True)  # the files' bytes
    # A daemon that is not running starts from the database, where nothing of the tenant is left.
    with contextlib.suppress(AdminUnavailable):
        try:
            _admin(settings).call("POST", tenant_path(name, "removed"))
        except AdminError as exc:
            print(f"the daemon keeps {name}'s quota use until it restarts: {exc}", file=sys.stderr)
    folder = settings.adapters_dir / name
    if folder.is_dir() and not folder.is_symlink():
        if args.purge:
            shutil.rmtree(folder)
            print(f"deleted its adapters ({folder})")
        else:
            archive = settings.adapters_dir / ".archive"
            archive.mkdir(mode=0o750, exist_ok=True)
            target = archive / f"{name}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
            folder.rename(target)
            print(f"moved its adapters to {target} (a running daemon unloads them)")


def _tenant_show(args: argparse.Namespace) -> None:
    settings = _settings(args)
    try:
        report = _admin(settings).call("GET", tenant_path(args.name, "policy"))
        own, quota, load = report["own"], report["quota"], report["load"]
    except AdminUnavailable:
        with Store.open(settings.database_path) as store:
            if store.get_tenant(args.name) is None:
                raise LoraboxError(f"no tenant named {args.name!r}") from None
            own = store.policy_values(args.name)
            policy = effective(settings.tenant_defaults, own)
            start = period_start(policy.quota_period, datetime.now(UTC))
            used = store.tokens_since(timestamp(start)).get(args.name, 0)
        quota = {"used_tokens": used, "limit_tokens": policy.quota_tokens, "period_start": start.isoformat()}
        load = None
    policy = effective(settings.tenant_defaults, own)
    print(
        f"tenant {args.name}"
        + ("" if load is None else f"  (now: {load['running']} running, {load['queued']} queued)")
    )
    for field in FIELDS:
        source = "tenant" if field in own else "default"
        print(f"  {field:<15} {describe(field, getattr(policy, field)):<40} ({source})")
    limit = quota["limit_tokens"]
    of = f" of {limit:,} ({100 * quota['used_tokens'] / limit:.1f}%)" if limit else " (no quota)"
    state = ", throttled" if quota.get("state") == "throttled" else ""
    print(f"quota: {quota['used_tokens']:,} tokens used{of} since {quota['period_start'][:10]}{state}")


def _issue_service_key(store: Store, args: argparse.Namespace) -> IssuedKey:
    if args.target is not None:
        raise LoraboxError("a service key is no tenant's: name its tenants with --tenants, not TENANT")
    if (args.tenants is None) == (not args.all_tenants):
        raise LoraboxError("a service key needs --tenants acme,globex or --all-tenants (one of them)")
    tenants = (
        None if args.all_tenants else [tenant_name(t.strip()) for t in args.tenants.split(",") if t.strip()]
    )
    if tenants == []:
        raise LoraboxError("--tenants names no tenant")
    limits = parse_values({k: v for k, v in (("rpm", args.rpm), ("tpm", args.tpm)) if v is not None})
    return store.issue_service_key(args.service, tenants, rpm=limits.get("rpm"), tpm=limits.get("tpm"))


def cmd_key(args: argparse.Namespace) -> None:
    with Store.open(_settings(args).database_path) as store:
        if args.action == "issue":
            service = args.service is not None
            if not service and (args.tenants or args.all_tenants or args.rpm or args.tpm):
                raise LoraboxError(
                    "--tenants, --all-tenants, --rpm and --tpm are for service keys (--service NAME)"
                )
            if not service and args.target is None:
                raise LoraboxError("name the tenant the key is for (or --service NAME for a service key)")
            issued = _issue_service_key(store, args) if service else store.issue_key(args.target)
            print(issued.plaintext)
            whose = f"service key {issued.tenant}" if service else f"tenant {issued.tenant}"
            print(
                f"key id {issued.key_id} for {whose}. This key is shown once; store it now.",
                file=sys.stderr,
            )
        elif args.action == "import":
            line = _read_bounded(lambda: sys.stdin.readline(4096), "the key on stdin")
            key_id = store.import_key(args.target, line.strip())
            print(f"imported key {key_id} for tenant {args.target}")
        elif args.action == "revoke":
            tenant, key_id = store.revoke_key(args.target)
            print(f"revoked key {key_id} of tenant {tenant}")
        else:
            _table(store.list_keys(args.target), ["key_id", "tenant", "created_at", "revoked_at"])
            if services := store.list_service_keys(args.target):
                print()
                columns = ["key_id", "name", "tenants", "rpm", "tpm", "created_at", "revoked_at"]
                _table([k | {"name": f"service {k['name']}"} for k in services], columns)


def _admin(settings: Settings) -> AdminClient:
    return AdminClient(settings.admin_socket_path)


def cmd_adapters(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.action == "list":
        try:
            rows = _admin(settings).call("GET", "/admin/adapters")["adapters"]
        except AdminUnavailable:
            rows = _adapter_rows_offline(settings)
        if args.tenant:
            rows = [r for r in rows if r["tenant"] == args.tenant]
        for row in rows:
            row["active"] = "*" if row["active"] else ""
            row["canary"] = f"{row['canary_percent']}%" if row.get("canary_percent") else ""
            row["sha256"] = row["sha256"][:12]
            row["reason"] = row["reason"] or row.get("note", "")  # a note: it serves, on another base
        _table(
            rows,
            [
                "tenant",
                "version",
                "active",
                "canary",
                "state",
                "rank",
                "size_bytes",
                "requests",
                "sha256",
                "reason",
            ],
        )
        return
    client = _admin(settings)
    if args.action == "activate":
        result = client.call("POST", tenant_path(args.tenant, "activate"), {"version": args.version})
        print(
            f"{args.tenant} now serves {result['active']} (pinned; `lorabox adapters unpin {args.tenant}` "
            "follows the newest again)"
        )
    elif args.action == "accept":
        result = client.call("POST", tenant_path(args.tenant, "accept"), {"version": args.version})
        print(f"{args.tenant}@{args.version} accepted although trained on another base: {result['state']}")
    elif args.action == "unpin":
        result = client.call("POST", tenant_path(args.tenant, "activate"), {"version": None})
        print(f"{args.tenant} follows its newest version: {result['active']}")
    elif args.action == "canary":
        result = client.call(
            "POST", tenant_path(args.tenant, "canary"), {"version": args.version, "percent": args.percent}
        )
        canary = result["canary"]
        print(
            f"{args.tenant}: canary {canary['version']} gets {canary['percent']}% of requests"
            if canary
            else f"{args.tenant}: no canary"
        )


def cmd_residency(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.action in ("pin", "unpin"):
        keep = args.action == "pin"
        try:
            result = _admin(settings).call("POST", tenant_path(args.tenant, "resident"), {"keep": keep})
        except AdminUnavailable:
            _keep_resident_offline(settings, args.tenant, keep)
            print(f"{args.tenant}: saved; applies when the daemon starts (it is not running)")
            return
        if not keep:
            print(f"{args.tenant}: no longer pinned; its adapter follows the LRU like the others")
        elif result["pinned_version"]:
            print(f"{args.tenant}: {result['pinned_version']} is pinned in a GPU slot")
        else:
            print(f"{args.tenant}: will be pinned once it has an active version (see `lorabox events`)")
        return
    report = _admin(settings).call("GET", "/admin/residency")
    print(f"plan: {report['plan']['reason']}")
    kept = ", ".join(report["kept_resident"]) or "(none)"
    print(f"kept resident: {kept} (at most {report['pinnable_slots']})")
    counts = report["counts"]
    print(f"now: {counts['gpu']} in GPU slots, {counts['cpu']} in host memory, {counts['disk']} on disk\n")
    for row in report["adapters"]:
        row["pinned"] = "pin" if row["pinned"] else ""
        used = row["last_used"]
        row["last_used"] = time.strftime("%H:%M:%S", time.localtime(used)) if used else ""
    _table(report["adapters"], ["tenant", "version", "tier", "pinned", "last_used", "size_bytes"])


def _keep_resident_offline(settings: Settings, tenant: str, keep: bool) -> None:
    with Store.open(settings.database_path) as store:
        if store.get_tenant(tenant) is None and not store.adapters(tenant):
            raise LoraboxError(f"unknown tenant {tenant!r}")
        before = store.route(tenant).keep_resident
        if store.set_keep_resident(tenant, keep):
            action = "residency_pin" if keep else "residency_unpin"
            store.audit(None, action, tenant, Change({"keep_resident": before}, {"keep_resident": keep}))


def _adapter_rows_offline(settings: Settings) -> list[dict]:  # type: ignore[type-arg]
    """The registry as last recorded, when the daemon is not running."""
    with Store.open(settings.database_path) as store:
        return [
            dataclasses.asdict(a)
            | {
                "active": store.route(a.tenant).active_version == a.version,
                "canary_percent": 0,
                "requests": "",
            }
            for a in store.adapters()
        ]


def cmd_export(args: argparse.Namespace) -> None:
    """Written here, with the operator's own rights, wherever they may write; recorded in the
    audit log like the daemon's exports (an export that cannot be recorded is removed)."""
    from ..gguf.export import Exporter, tenant_adapter

    settings = _settings(args)
    with Store.open(settings.database_path) as store:
        adapter = tenant_adapter(store, args.tenant, args.version)
        with store.writing():  # the audit log takes writes (else: no export to leave unrecorded)
            pass
    out = Path(args.out)
    print(f">>> Merging {adapter.label} into the base model as {args.quant} GGUF: {out}", flush=True)
    result = Exporter(_model_dir(settings), settings.exports_path).run(adapter, args.quant, out)
    done = {"version": adapter.version, "quant": args.quant, "path": str(result.path.resolve())}
    try:
        with Store.open(settings.database_path) as store:
            change = Change({}, done | {"size_bytes": result.size_bytes, "sha256": result.sha256})
            store.audit(None, "export", args.tenant, change)
    except (LoraboxError, sqlite3.Error) as exc:
        result.path.unlink(missing_ok=True)
        result.modelfile.unlink(missing_ok=True)
        raise LoraboxError(f"export removed: the audit log could not record it ({exc})") from exc
    print(f"wrote {result.path} ({result.size_bytes / (1 << 20):.1f} MiB) and {result.modelfile}")
    print(f"next: llama-cli -m {result.path}   or   ollama create {out.stem} -f {result.modelfile}")


def cmd_events(args: argparse.Namespace) -> None:
    with Store.open(_settings(args).database_path) as store:
        _table(list(reversed(store.events(args.limit))), ["ts", "kind", "tenant", "version", "detail"])


def cmd_batches(args: argparse.Namespace) -> None:
    from ..batch.jobs import list_batches

    with Store.open(_settings(args).database_path) as store:
        page, _ = list_batches(store, args.tenant, limit=args.limit)
    rows = []
    for batch in page:
        done = batch.completed + batch.failed
        share = f"{100 * done / batch.total:.0f}%" if batch.total else "-"
        created = datetime.fromtimestamp(batch.created_at, UTC).strftime("%Y-%m-%d %H:%M")
        rows.append(
            {"id": batch.id, "tenant": batch.tenant, "status": batch.status, "endpoint": batch.endpoint,
             "progress": f"{done}/{batch.total} {share}", "failed": batch.failed, "created": created}
        )  # fmt: skip
    _table(rows, ["id", "tenant", "status", "endpoint", "progress", "failed", "created"])


def moment(option: str) -> Callable[[str], str]:
    """An argparse type: `7d`, `24h`, `30m`, `2w` ago (ASCII digits, within 100 years), or a date
    or time (ISO 8601, UTC unless it says otherwise), as the ledger writes times."""
    units = {"d": "days", "h": "hours", "m": "minutes", "w": "weeks"}

    def parse(text: str) -> str:
        text = text.strip()
        unit, count = text[-1:], text[:-1]
        try:
            if text.isascii() and unit in units and count.isdigit():
                if int(count) > MAX_AGO[unit]:
                    raise LoraboxError(
                        f"{option}: at most 100 years ago ({MAX_AGO[unit]}{unit}), not {text[:40]!r}"
                    )
                return timestamp(datetime.now(UTC) - timedelta(**{units[unit]: int(count)}))
            if text.isascii():
                when = datetime.fromisoformat(text)
                return timestamp(when if when.tzinfo else when.replace(tzinfo=UTC))
        except (ValueError, OverflowError):
            pass
        raise LoraboxError(
            f"{option}: use e.g. 7d, 24h, 30m, 2026-11-01 or 2026-11-01T12:00, not {text[:40]!r}"
        )

    return parse


def cmd_usage(args: argparse.Namespace) -> None:
    tenant = args.tenant_option or args.tenant
    settings = _settings(args)
    with _usage_store(settings, args.from_files) as (store, box):
        if args.rows:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(USAGE_COLUMNS)
            rows = store.usage_rows(tenant, args.since, args.until, box)
            writer.writerows([["" if row[c] is None else row[c] for c in USAGE_COLUMNS] for row in rows])
            return
        rows = store.usage_report(tenant, args.since, args.until, args.by or "", box)
    columns = (["period"] if args.by else []) + [
        "tenant",
        "tier",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost",
    ]
    if args.csv or args.from_files:
        columns.append("box_id")  # several boxes' ledgers add up: say whose rows these are
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[row[c] for c in columns] for row in rows])
        return
    for row in rows:
        row["cost"] = f"{row['cost']:.4f}"
    _table(rows, columns)


@contextmanager
def _usage_store(settings: Settings, files: list[str] | None) -> Iterator[tuple[Store, str]]:
    """This box's ledger (and its box id, for rows that name none); or, `--from`, the rows of
    `lorabox usage --rows` exports in a database in memory, each row (its uid) once."""
    if not files:
        with Store.open(settings.database_path) as store:
            yield store, store.box_id(settings.box_id)
        return
    with Store.open(":memory:") as merged:
        read = duplicates = 0
        for path in files:
            rows = _usage_export(path)
            before = merged.db.execute("select count(*) from usage").fetchone()[0]
            merged.record_usage(rows)
            added = merged.db.execute("select count(*) from usage").fetchone()[0] - before
            read, duplicates = read + len(rows), duplicates + len(rows) - added
        print(
            f"merged {read - duplicates} rows from {len(files)} files ({duplicates} repeated: counted once)",
            file=sys.stderr,
        )
        yield merged, ""


USAGE_INTS = ("status", "prompt_tokens", "completion_tokens")
USAGE_FLOATS = ("ttft_ms", "latency_ms", "price_in", "price_out")


def _usage_export(path: str) -> list[dict[str, Any]]:
    """The rows of one `lorabox usage --rows` export; LoraboxError naming the file and line."""
    text = read_text_file(path, 1 << 30, f"--from {path}")
    reader = csv.DictReader(text.splitlines())
    needed = set(USAGE_COLUMNS) - set(USAGE_COLUMNS_ADDED)
    if reader.fieldnames is None or not needed <= set(reader.fieldnames):
        raise LoraboxError(
            f"--from {path}: not a usage export (uid, box_id, ...): make one with `lorabox usage --rows`"
        )
    rows = []
    for number, raw in enumerate(reader, start=2):
        row: dict[str, Any] = {c: (raw.get(c) or None) for c in USAGE_COLUMNS}
        try:
            if not row["uid"] or not row["tenant"] or not row["ts"]:
                raise ValueError("uid, tenant and ts are needed")
            for column in USAGE_INTS:
                row[column] = int(row[column]) if row[column] is not None else None
            for column in USAGE_FLOATS:
                row[column] = float(row[column]) if row[column] is not None else None
        except ValueError as exc:
            raise LoraboxError(f"--from {path}: line {number}: {exc}") from None
        rows.append(row)
    return rows


def cmd_fleet(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.action == "export":
        with Store.open(settings.database_path) as store:
            document = fleet.export(store, store.box_id(settings.box_id))
        print(json.dumps(document, indent=1, ensure_ascii=False))
        return
    data = fleet.read(read_text_file(args.file, fleet.MAX_BYTES, "fleet import"))
    with Store.open(settings.database_path) as store:
        changes = fleet.plan(store, data)
        if not args.dry_run and not changes.empty:
            fleet.apply(store, changes)
    for line in changes.summary():
        print(line)
    if args.dry_run or changes.empty:
        print("nothing changed" if changes.empty else "dry run: nothing changed")
        return
    # New tenants and pins apply at once where the daemon runs (policies within seconds, keys at the
    # next request: both are read from the database); else when it starts.
    try:
        client = _admin(settings)
        for tenant in changes.touched:
            client.call("POST", tenant_path(tenant, "sync"))
    except AdminUnavailable:
        print("the daemon was not reachable: it applies this when it starts")


def cmd_audit(args: argparse.Namespace) -> None:
    if args.verify or args.export:
        _audit_chain(args)
        return
    with Store.open(_settings(args).database_path) as store:
        rows = list(reversed(store.audit_log(args.tenant, args.limit)))
    for row in rows:
        row["change"] = change_text(row["before"], row["after"])
    _table(rows, ["ts", "actor", "action", "tenant", "change"])


def _audit_chain(args: argparse.Namespace) -> None:
    """`--verify`: the first row that breaks the chain, named (status 1); `--export`: every row
    with its hashes as JSON lines, and the head to keep, on stderr."""
    with Store.open(_settings(args).database_path) as store:
        verdict = auditchain.verify(store.db)
        if verdict.problem:
            raise LoraboxError(f"the audit log was tampered with: {verdict.problem}")
        if args.export:
            with contextlib.ExitStack() as stack:
                out = sys.stdout if args.export == "-" else stack.enter_context(open(args.export, "w"))
                for row in auditchain.rows(store.db):
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(
        f"audit log intact: {verdict.rows} rows, head {verdict.head}",
        file=sys.stderr if args.export == "-" else sys.stdout,
    )


def cmd_status(args: argparse.Namespace) -> None:
    from .report import status_text

    client = _admin(_settings(args))
    status = client.call("GET", "/admin/status")
    tenants = client.call("GET", "/admin/tenants")["tenants"]
    if args.json:
        print(json.dumps({"status": status, "tenants": tenants}, indent=2))
    else:
        print(status_text(status, tenants))


def cmd_ps(args: argparse.Namespace) -> None:
    from .report import ps_rows, ps_text

    rows = ps_rows(_admin(_settings(args)).call("GET", "/admin/residency")["adapters"])
    print(json.dumps({"adapters": rows}, indent=2) if args.json else ps_text(rows))


def cmd_tui(args: argparse.Namespace) -> None:
    from tui.app import run

    socket = args.socket or _settings(args).admin_socket_path
    run(str(socket), readonly=args.readonly, interval_s=args.interval)


def _refresh_interval(text: str) -> float:
    try:
        seconds = float(text) if text.isascii() else -1.0
    except ValueError:
        seconds = -1.0
    if not 0.5 <= seconds <= 60:  # NaN fails too
        raise LoraboxError(f"--interval: the refresh interval is 0.5 to 60 seconds, not {text[:40]!r}")
    return seconds


def cmd_doctor(args: argparse.Namespace) -> None:
    from . import doctor

    root = Path(args.root).resolve() if args.root else None
    config = Path(args.config) if getattr(args, "config", None) else None
    if doctor.report(doctor.run(config, root=root, service_user=args.user)):
        raise SystemExit(1)


def cmd_logs(args: argparse.Namespace) -> None:
    import shutil

    journalctl = shutil.which("journalctl")
    if journalctl is None:
        raise LoraboxError(
            "journalctl not found: `lorabox logs` reads systemd's journal; "
            "a daemon started by hand logs to its own stderr"
        )
    argv = [journalctl, "--unit", "lorabox.service", "--lines", str(args.lines), "--no-pager"]
    argv += ["--follow"] if args.follow else []
    argv += ["--since", args.since] if args.since else []
    sys.stdout.flush()
    os.execv(journalctl, argv)  # noqa: S606 (journalctl takes over the terminal, for -f)


def cmd_model(args: argparse.Namespace) -> None:
    from ..config.basemodel import model_source, resolve

    settings = _settings(args)
    source = model_source(settings)
    if source.kind == "builtin":
        print(f"model: {source.describe()}, written at the first start: nothing to fetch")
        return
    folder = resolve(settings)
    print(f"model: {source.repo_id or source.path} in {folder}")


def cmd_config(args: argparse.Namespace) -> None:
    if args.example:
        from ..config.example import example_config

        sys.stdout.write(example_config())
        return
    settings = _settings(args)
    print(f"# from {settings.source or '(defaults and environment)'}")
    for field in dataclasses.fields(Settings):
        value = getattr(settings, field.name)
        if field.name in ("source", "tenant_defaults") or value is None:
            continue
        print(f"{field.name} = {_toml(value)}")
    print("\n[tenant_defaults]")
    for name, value in dataclasses.asdict(settings.tenant_defaults).items():
        print(f"{name} = {_toml('none' if value is None else value)}")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):  # guardrail patterns: an array of basic strings
        return "[" + ", ".join(_toml(str(v)) for v in value) + "]"
    return json.dumps(value if isinstance(value, int | float) else str(value), ensure_ascii=False)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a nested subcommand must not reset a --config given before it to None.
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="settings file (default: $LORABOX_CONFIG or /etc/lorabox/lorabox.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="lorabox", description="One base model, one LoRA adapter per tenant, an OpenAI-compatible API."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    port = whole_number("--port", 1, 65535)
    p = sub.add_parser("serve", parents=[common], help="run the daemon (OpenAI-compatible API)")
    p.add_argument("--port", type=port)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="write the built-in demo and serve it: lorabox demo [init] [DIR]")
    p.add_argument("words", nargs="*", metavar="[init] [DIR]")
    p.add_argument("--port", type=port)
    p.add_argument("--force", action="store_true", help="also rewrite lorabox.toml")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tenant", parents=[common], help="add or list tenants")
    tsub = p.add_subparsers(dest="action", required=True)
    add = tsub.add_parser("add", parents=[common])
    add.add_argument("name", type=tenant_name)
    add.add_argument("--allow-base", action="store_true", help="tenant may also call the base model")
    tsub.add_parser("list", parents=[common])
    tset = tsub.add_parser(
        "set",
        parents=[common],
        help="set a tenant's policy (applies to its next request)",
        description="Each value may also be `default` (follow [tenant_defaults] in the config) or, for "
        "limits, `none` (no limit). Prices are per million tokens.",
    )
    tset.add_argument("name", type=tenant_name)
    for field in POLICY_OPTIONS:
        if field in PATTERN_FIELDS:
            tset.add_argument(
                f"--{field.replace('_', '-')}",
                dest=field,
                action="append",
                metavar="PATTERN",
                help="an RE2 pattern; repeat for several (they replace the list); `none` clears it",
            )
            tset.add_argument(
                f"--{field.replace('_', '-')}-file",
                dest=f"{field}_file",
                metavar="FILE",
                help=f"the {field} patterns, one a line (- reads stdin; empty lines are skipped)",
            )
            continue
        tset.add_argument(
            f"--{field.replace('_', '-')}",
            dest=field,
            metavar={
                "quota_period": "|".join(QUOTA_PERIODS),
                "quota_action": "|".join(QUOTA_ACTIONS),
                "redact_output": "email,phone,card",
            }.get(field, "N"),
        )
    tset.add_argument(
        "--system-prompt-file",
        metavar="FILE",
        help=f"the first system message of every chat request (UTF-8, at most {MAX_SYSTEM_PROMPT_CHARS} "
        "characters; - reads stdin); `none` removes it",
    )
    tremove = tsub.add_parser(
        "remove",
        parents=[common],
        help="revoke its keys, drop its policy and routes, archive its adapters; --purge deletes all",
    )
    tremove.add_argument("name", type=tenant_name)
    tremove.add_argument(
        "--purge", action="store_true", help="delete its adapters and usage rows too (asks to type the name)"
    )
    tremove.add_argument("--confirm", metavar="NAME", help="the name, typed ahead (for --purge in scripts)")
    tsub.add_parser("show", parents=[common], help="a tenant's effective policy and quota use").add_argument(
        "name", type=tenant_name
    )
    p.set_defaults(func=cmd_tenant)

    p = sub.add_parser("key", parents=[common], help="issue, revoke or list API keys")
    ksub = p.add_subparsers(dest="action", required=True)
    kissue = ksub.add_parser(
        "issue",
        parents=[common],
        help="a tenant's key, or (--service) a key that acts for the tenants each request names",
    )
    kissue.add_argument("target", metavar="TENANT", nargs="?", type=tenant_name)
    kissue.add_argument("--service", metavar="NAME", type=tenant_name, help="issue a service key named NAME")
    kissue.add_argument("--tenants", metavar="A,B", help="the tenants a service key may act for")
    kissue.add_argument("--all-tenants", action="store_true", help="a service key for every tenant")
    kissue.add_argument("--rpm", metavar="N", help="a service key's own requests per minute")
    kissue.add_argument("--tpm", metavar="N", help="a service key's own tokens per minute")
    ksub.add_parser(
        "import", parents=[common], help="accept a key issued on another box (read from stdin)"
    ).add_argument("target", metavar="TENANT", type=tenant_name)
    ksub.add_parser("revoke", parents=[common]).add_argument("target", metavar="KEY_ID")
    ksub.add_parser("list", parents=[common]).add_argument(
        "target", metavar="TENANT", nargs="?", type=tenant_name
    )
    p.set_defaults(func=cmd_key)

    p = sub.add_parser(
        "adapters", parents=[common], help="registered adapter versions, refusals with reasons"
    )
    asub = p.add_subparsers(dest="action", required=True)
    asub.add_parser("list", parents=[common]).add_argument("tenant", nargs="?", type=tenant_name)
    act = asub.add_parser("activate", parents=[common], help="pin a version (rollback); needs the daemon")
    act.add_argument("tenant", type=tenant_name)
    act.add_argument("version")
    asub.add_parser("unpin", parents=[common], help="follow the newest version again").add_argument(
        "tenant", type=tenant_name
    )
    acc = asub.add_parser(
        "accept", parents=[common], help="serve a version trained on another base (strict_base_match)"
    )
    acc.add_argument("tenant", type=tenant_name)
    acc.add_argument("version")
    can = asub.add_parser("canary", parents=[common], help="send N%% of a tenant's requests to a version")
    can.add_argument("tenant", type=tenant_name)
    can.add_argument("version")
    can.add_argument(
        "--percent", type=whole_number("--percent", 0, 100), required=True, help="0 ends the canary"
    )
    p.set_defaults(func=cmd_adapters)

    p = sub.add_parser(
        "residency", parents=[common], help="where adapters live (GPU/host/disk); pin tenants to the GPU"
    )
    rsub = p.add_subparsers(dest="action")
    rsub.add_parser("show", parents=[common], help="the plan and every adapter's tier (the default)")
    for action, text in (
        ("pin", "keep a tenant's active adapter in a GPU slot"),
        ("unpin", "let the tenant's adapter follow the LRU again"),
    ):
        rsub.add_parser(action, parents=[common], help=text).add_argument("tenant", type=tenant_name)
    p.set_defaults(func=cmd_residency)

    p = sub.add_parser(
        "export", parents=[common], help="one tenant's model as a single GGUF file (llama.cpp, Ollama)"
    )
    p.add_argument("tenant", type=tenant_name)
    p.add_argument("--version", help="adapter version (default: the active one)")
    p.add_argument(
        "--quant", choices=EXPORT_QUANTS, default="f16", help="f32/f16 as is; q8_0, q4_k_m by llama.cpp"
    )
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="also writes FILE.Modelfile for Ollama")
    p.set_defaults(func=cmd_export)

    limit = whole_number("--limit", 1, MAX_LIMIT)
    p = sub.add_parser("events", parents=[common], help="adapter and key events, newest last")
    p.add_argument("--limit", type=limit, default=50, help=f"at most {MAX_LIMIT}")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser(
        "batches", parents=[common], help="batch jobs (/v1/batches), newest first, with progress"
    )
    p.add_argument("--tenant", type=tenant_name, help="only this tenant's")
    p.add_argument("--limit", type=whole_number("--limit", 1, 100), default=20, help="at most 100")
    p.set_defaults(func=cmd_batches)

    p = sub.add_parser("usage", parents=[common], help="requests, tokens and cost per tenant (the ledger)")
    p.add_argument("tenant", nargs="?", type=tenant_name)
    p.add_argument("--tenant", dest="tenant_option", metavar="TENANT", type=tenant_name)
    p.add_argument("--since", type=moment("--since"), help="7d, 24h, 30m ago, or a date/time (UTC)")
    p.add_argument("--until", type=moment("--until"), help="as --since; up to (not including) it")
    p.add_argument("--by", choices=("day", "month"), help="one row per tenant and day (or month)")
    p.add_argument(
        "--csv", action="store_true", help="comma-separated values, for a spreadsheet (with each row's boxes)"
    )
    p.add_argument(
        "--rows",
        action="store_true",
        help="every request's row as CSV (uid, box_id, ...): an export for `lorabox usage --from`",
    )
    p.add_argument(
        "--from",
        dest="from_files",
        nargs="+",
        metavar="FILE",
        help="add up `--rows` exports of several boxes (each row once) instead of this box's ledger",
    )
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser(
        "fleet", parents=[common], help="one set of tenants, keys and policies for several boxes"
    )
    fsub = p.add_subparsers(dest="action", required=True)
    fsub.add_parser(
        "export", parents=[common], help="tenants, key hashes (never keys), policies and pins, as JSON"
    )
    fimport = fsub.add_parser(
        "import", parents=[common], help="merge an export: adds what is missing, keeps what is newer here"
    )
    fimport.add_argument("file", nargs="?", default="-", help="the export (default: stdin)")
    fimport.add_argument("--dry-run", action="store_true", help="only say what would change")
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("audit", parents=[common], help="operator actions: who changed what, when")
    p.add_argument("--tenant", type=tenant_name)
    p.add_argument("--limit", type=limit, default=100, help=f"at most {MAX_LIMIT}")
    p.add_argument(
        "--verify",
        action="store_true",
        help="check the hash chain; names the first row edited, inserted or deleted",
    )
    p.add_argument(
        "--export",
        metavar="FILE",
        help="every row with its hashes as JSON lines ('-': stdout), once verified",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "status", parents=[common], help="the box now: engine, device, totals and every tenant's traffic"
    )
    p.add_argument("--json", action="store_true", help="the admin API's status and tenants, as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("ps", parents=[common], help="loaded adapters: size, tier, pinned, idle since")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("tui", parents=[common], help="watch and steer the box live (terminal UI)")
    p.add_argument(
        "--socket", type=Path, help="the admin socket (default: <state_dir>/admin.sock from the config)"
    )
    p.add_argument("--readonly", action="store_true", help="watch only: no activate, pin, canary or revoke")
    p.add_argument(
        "--interval",
        type=_refresh_interval,
        default=2.0,
        help="refresh period in seconds (default 2; r cycles)",
    )
    p.set_defaults(func=cmd_tui)

    p = sub.add_parser(
        "doctor", parents=[common], help="check this box: driver, engines, port, folders, config, daemon"
    )
    p.add_argument("--root", help="check an install made with install.sh --root DIR")
    p.add_argument("--user", help="the service user (default: the unit's User=, else lorabox)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("logs", help="the daemon's log (systemd journal): lorabox logs [-f]")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument(
        "-n",
        "--lines",
        type=whole_number("--lines", 1, 1_000_000),
        default=100,
        help="how many recent lines (default 100)",
    )
    p.add_argument("--since", help='e.g. "1 hour ago", "today" (journalctl --since)')
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("model", parents=[common], help="the base model: lorabox model fetch")
    msub = p.add_subparsers(dest="action", required=True)
    msub.add_parser(
        "fetch", parents=[common], help="download the configured Hugging Face model now (else: at start)"
    )
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("config", parents=[common], help="print the effective settings")
    p.add_argument(
        "--example", action="store_true", help="print every setting with its documentation and default"
    )
    p.set_defaults(func=cmd_config)
    return parser


def _error_prefix() -> str:
    """Under systemd, "<3>": the journal files the message at priority "err"."""
    from .systemd import writes_to_journal

    return "<3>" if writes_to_journal() else ""


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)  # checks what was typed (LoraboxError)
        args.func(args)
    except ConfigError as exc:
        if args is None or args.func is not cmd_serve:
            return _fail(str(exc))
        print(f"{_error_prefix()}lorabox: {exc}", file=sys.stderr)
        return EXIT_CONFIG  # the unit does not restart the daemon for it
    except (LoraboxError, AdminError, AdminUnavailable) as exc:
        return _fail(str(exc))
    except sqlite3.Error as exc:
        return _fail(str(unavailable(exc, "the state database")))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args is not None and args.func in (cmd_serve, cmd_demo):
            raise  # the daemon's own failure: its traceback belongs in the journal
        return _fail(f"unexpected error ({type(exc).__name__}: {exc}); please report it with the command")
    return 0


def _fail(message: str) -> int:
    """One line on stderr, status 1."""
    print(f"{_error_prefix()}lorabox: {' '.join(message.split())}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
