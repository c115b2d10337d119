"""A fresh Debian 12 server with systemd as PID 1, booted in a container, for the tests that need
a real systemd (tests/system/; run on demand, never in the default run: tests/conftest.py).

The root is built once with debootstrap (about 6 minutes) and cached outside the repository in
$LORABOX_SYSTEM_CACHE (default /var/cache/lorabox-system-test); each run boots a throwaway overlay
of it, so the cache stays a fresh server. Into the overlay go what a server on this network would
have: the host's CA certificates, apt sources and pip configuration (and the local folders that
configuration names, read-only), and llama-cpp-python wheels built before (install.sh's
LORABOX_WHEEL_CACHE), so that the install does not compile llama.cpp for 9 minutes. pip's cache is
shared between runs, in the cache folder.

Booted with `systemd-nspawn -b --register=no --keep-unit --private-network` (without the first two
it fails here with "Failed to open system bus"; the private network keeps the host's loopback ports
out of it). Commands run inside through nsenter: in all its namespaces by default; `net=False`
leaves out the network namespace, for pip and apt to reach the registries.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

CACHE = Path(os.environ.get("LORABOX_SYSTEM_CACHE", "/var/cache/lorabox-system-test"))
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "python3-dev",
    "git",
    "curl",
    "ca-certificates",
    "build-essential",
    "cmake",
    "pciutils",
    "iproute2",
    "procps",
    "sudo",
]
PIP_CONFIGS = ["/etc/pip.conf", "/etc/xdg/pip", "~/.config/pip", "~/.pip"]
APT_SOURCES = ["/etc/apt/sources.list", "/etc/apt/sources.list.d", "/etc/apt/apt.conf.d"]
CA_CERTIFICATES = ["/etc/ssl/certs", "/usr/local/share/ca-certificates"]
WHEELS = Path(os.environ.get("LORABOX_WHEEL_CACHE", "~/.cache/lorabox/wheels")).expanduser()
INNER_WHEELS = "/var/cache/lorabox-wheels"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _mirror() -> str:
    """The Debian mirror apt uses on this host."""
    for source in [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]:
        with contextlib.suppress(OSError):
            found = re.search(
                r"(?:^URIs:\s*|^deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s*$", source.read_text(), re.M
            )
            if found:
                return found.group(1)
    return "http://deb.debian.org/debian"


def debian_root(log: Path) -> Path:
    """The cached Debian 12 root, built now if it is not there yet."""
    root = CACHE / "debian12-root"
    if (root / "usr/lib/systemd/systemd").exists():
        return root
    shutil.which("debootstrap") or _fail(
        "debootstrap is missing: apt-get install debootstrap systemd-container"
    )
    building = CACHE / "debian12-root.partial"
    shutil.rmtree(building, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        subprocess.run(
            ["debootstrap", f"--include={','.join(PACKAGES)}", "bookworm", str(building), _mirror()],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=3600,
        )
    building.rename(root)
    return root


def _fail(message: str) -> None:
    raise RuntimeError(message)


def _copy_in(root: Path, host_path: str, inner: str | None = None) -> None:
    """The host's file or folder at the same place in `root` (or at `inner`), replacing what is there."""
    source = Path(host_path).expanduser()
    if not source.exists():
        return
    target = root / (inner or str(source)).lstrip("/")
    files = (
        [source]
        if not source.is_dir()
        else [p for p in source.rglob("*") if not p.is_dir() or p.is_symlink()]
    )
    for path in files:
        into = target / path.relative_to(source) if source.is_dir() else target
        into.parent.mkdir(parents=True, exist_ok=True)
        if into.is_symlink() or into.exists():
            into.unlink()
        if path.is_symlink():
            into.symlink_to(os.readlink(path))
        else:
            shutil.copy2(path, into)


def _pip_folders() -> list[Path]:
    """Local folders the host's pip configuration names (find-links, file:// indexes): bound
    read-only into the container at the same paths, so that the configuration works there too."""
    folders: list[Path] = []
    texts = [os.environ.get(name, "") for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL")]
    for config in PIP_CONFIGS:
        path = Path(config).expanduser()
        files = [path] if path.is_file() else sorted(path.glob("*.conf")) if path.is_dir() else []
        texts += [f.read_text() for f in files]
    for text in texts:
        for found in re.findall(r"(?:file://)?(/[\w./-]+)", text):
            candidate = Path(found)
            # An index's "simple" folder lives in the folder to bind; a find-links folder is one.
            folder = candidate.parent if candidate.name == "simple" else candidate
            if folder.is_dir() and not str(folder).startswith(("/etc", "/usr", "/root", "/home")):
                folders.append(folder)
    return sorted(set(folders))


@dataclass
class Container:
    """A booted container; `run` executes in it."""

    name: str
    root: Path
    init_pid: int
    nspawn: subprocess.Popen[bytes]

    def command(self, script: str, net: bool = True) -> list[str]:
        """The argv that runs `script` (bash) inside, as root in a login-like environment."""
        namespaces = ["-m", "-u", "-i", "-p", "-C"] + (["-n"] if net else [])
        environment = ["env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "USER=root"]
        return ["nsenter", "-t", str(self.init_pid), *namespaces, *environment, "bash", "-c", script]

    def run(
        self, script: str, *, net: bool = True, timeout: float = 600, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(script, net), capture_output=True, text=True, timeout=timeout, cwd="/"
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"`{script}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def out(self, script: str, **kwargs: object) -> str:
        return self.run(script, check=True, **kwargs).stdout.strip()  # type: ignore[arg-type]

    def wait_for(self, script: str, timeout: float, what: str, interval: float = 1.0) -> str:
        """Runs `script` until it succeeds; its output. Fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.run(script, timeout=max(timeout, 30))
            if result.returncode == 0:
                return result.stdout.strip()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not within {timeout:g} s (last: {result.stdout}{result.stderr})"
                )
            time.sleep(interval)


def _init_pid(nspawn: int) -> int | None:
    """The container's PID 1, seen from here: a descendant of nspawn whose own namespace calls it 1."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(nspawn).children(recursive=True):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{child.pid}/status").read_text()
                ids = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if ids and ids.group(1).split()[-1] == "1":
                    return child.pid
    return None


@contextlib.contextmanager
def booted(work: Path, repo: Path, log: Path) -> Iterator[Container]:
    """A Debian 12 server from the cache, with a clone of `repo` (its HEAD) in /root/lorabox,
    booted; powered off and gone afterwards."""
    lower = debian_root(log)
    for name in ("upper", "work", "merged"):
        (work / name).mkdir(parents=True)
    merged = work / "merged"
    options = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], check=True)
    nspawn = None
    try:
        if not Path("/etc/apt/sources.list").exists():  # the host's sources, and only those
            (merged / "etc/apt/sources.list").unlink(missing_ok=True)
        for path in ["/etc/resolv.conf", *CA_CERTIFICATES, *APT_SOURCES, *PIP_CONFIGS[:2]]:
            _copy_in(merged, path)
        for path in PIP_CONFIGS[2:]:
            _copy_in(merged, path, "/root/" + path.removeprefix("~/"))
        _copy_in(merged, str(WHEELS), INNER_WHEELS)
        (merged / "etc/hostname").write_text("lorabox-server\n")
        with (merged / "etc/hosts").open("a") as hosts:  # sudo looks its host up
            hosts.write("127.0.1.1 lorabox-server\n")
        subprocess.run(
            ["git", "clone", "--quiet", "--no-hardlinks", str(repo), str(merged / "root/lorabox")], check=True
        )
        pip_cache = CACHE / "pip-cache"
        pip_cache.mkdir(parents=True, exist_ok=True)
        binds = [f"--bind-ro={folder}" for folder in _pip_folders()] + [
            f"--bind={pip_cache}:/root/.cache/pip"
        ]
        name = f"lorabox-system-{os.getpid()}"
        with log.open("ab") as out:
            nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "-b",
                    "-D",
                    str(merged),
                    f"--machine={name}",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "--console=pipe",
                    *binds,
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while (pid := _init_pid(nspawn.pid)) is None:
            if nspawn.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the container did not boot; see {log}")
            time.sleep(0.5)
        container = Container(name, merged, pid, nspawn)
        container.wait_for("systemctl is-system-running --wait | grep -Eq 'running|degraded'", 300, "boot")
        yield container
    finally:
        if nspawn is not None:
            _power_off(nspawn)
        subprocess.run(["umount", "-l", str(merged)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _power_off(nspawn: subprocess.Popen[bytes]) -> None:
    """SIGRTMIN+3 to the container's init (a clean shutdown), then nspawn ends; force if not."""
    pid = _init_pid(nspawn.pid)
    if pid is not None:
        os.kill(pid, signal.SIGRTMIN + 3)
    try:
        nspawn.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(nspawn.pid, signal.SIGKILL)
        nspawn.wait(timeout=30)
