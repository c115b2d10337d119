"""Shared fixtures. The expensive ones (demo files, a running server, the HF reference) are
session-scoped: one engine start per test run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.api.adminclient import AdminClient
from appliance.demo.build import DEMO_MODEL_NAME, init_demo
from appliance.testing.adminreplay import AdminReplay
from appliance.testing.localserver import LocalServer, ServerFailed
from appliance.testing.reference import PeftReference

# tests/system/ boots a Debian server with systemd in a container and installs lorabox into it
# (root, debootstrap, 30+ minutes): run on demand, `LORABOX_SYSTEM_TESTS=1 pytest tests/system`.
collect_ignore = [] if os.environ.get("LORABOX_SYSTEM_TESTS") == "1" else ["system"]

SERVER_START_TIMEOUT_S = 300
# The shared server's read deadlines are short and its connection cap small, so that the tests of
# slow and of numerous connections take seconds; no other test sends slowly or opens that many. Not
# shorter: a test's client that a busy machine leaves unscheduled between opening a connection and
# sending its request is a slow sender too (36 requests at once were cut so, at 2 s, under load).
SERVER_SETTINGS = {"request_header_timeout_s": 5.0, "request_body_timeout_s": 6.0, "max_connections": 128}


@pytest.fixture(autouse=True)
def _isolate_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the machine's lorabox config or writes into the user's data directory."""
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@dataclass
class Demo:
    dir: Path
    keys: dict[str, str]

    @property
    def config(self) -> Path:
        return self.dir / "lorabox.toml"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    @property
    def database(self) -> Path:
        return self.dir / "state" / "lorabox.db"

    def adapter_dir(self, tenant: str, version: str = "v1") -> Path:
        return self.dir / "adapters" / tenant / version


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    directory = tmp_path_factory.mktemp("demo")
    return Demo(directory, init_demo(directory))


@pytest.fixture(scope="session")
def server(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`lorabox serve` as a real subprocess, as systemd would run it, on a free port."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        running = LocalServer.start(
            demo.config,
            log_path,
            timeout_s=SERVER_START_TIMEOUT_S,
            settings=SERVER_SETTINGS,
            env={"OMP_DISPLAY_ENV": "VERBOSE"},  # libgomp's settings, as it loads (test_openmp.py)
        )
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield Server(running, demo)
    running.stop()


@pytest.fixture(scope="session")
def llamacpp_demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """A demo directory of its own for the llama.cpp daemon (its drops disturb no other server)."""
    directory = tmp_path_factory.mktemp("llamacpp-demo")
    return Demo(directory, init_demo(directory))


def start_llamacpp(box: Demo) -> LocalServer:
    """`lorabox serve` on `box` with engine = "llamacpp" (raises ServerFailed)."""
    return LocalServer.start(
        box.config,
        box.dir / "server.log",
        timeout_s=SERVER_START_TIMEOUT_S,
        # libgomp prints its settings when it loads (the wait policy among them: test_openmp.py).
        env={"LORABOX_ENGINE": "llamacpp", "OMP_DISPLAY_ENV": "VERBOSE"},
    )


@pytest.fixture(scope="session")
def llamacpp_server(llamacpp_demo: Demo) -> Iterator[Server]:
    """`lorabox serve` with engine = "llamacpp": every live llama.cpp test shares this one."""
    try:
        running = start_llamacpp(llamacpp_demo)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield Server(running, llamacpp_demo)
    running.stop()


@pytest.fixture(scope="session")
def llamacpp_reference(llamacpp_demo: Demo) -> Reference:
    return Reference(llamacpp_demo)


@dataclass
class Server:
    local: LocalServer
    demo: Demo

    @property
    def url(self) -> str:
        return self.local.url

    @property
    def base_url(self) -> str:
        return self.local.base_url


class Reference(PeftReference):
    """The reference on a demo directory: a demo tenant's name stands for its v1 adapter."""

    def __init__(self, demo: Demo):
        super().__init__(demo.model_dir)
        self.demo = demo

    def adapter_folder(self, adapter: str | Path | None) -> Path | None:
        return self.demo.adapter_dir(adapter) if isinstance(adapter, str) else adapter


@pytest.fixture(scope="session")
def reference(demo: Demo) -> Reference:
    return Reference(demo)


@pytest.fixture(scope="session")
def base_model_name() -> str:
    return DEMO_MODEL_NAME


def serve_refused(config: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`lorabox serve --config config` run to its exit, as systemd runs it (no LORABOX_ variable of
    the test's own); its stdout is the exit status and the engines imported by then (`78 []`)."""
    serve = (
        "import sys\nfrom appliance.ops.cli import main\n"
        "print(main(sys.argv[1:]), sorted({'torch', 'vllm'} & set(sys.modules)))"
    )
    return subprocess.run(
        [sys.executable, "-c", serve, "serve", "--config", str(config)],
        cwd=Path(__file__).resolve().parents[1],
        env={k: v for k, v in os.environ.items() if not k.startswith("LORABOX_")},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def post_json(url: str, body: Any, key: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
    """A plain HTTP POST (no client library) for hostile-input tests; returns (status, JSON)."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST")  # noqa: S310 (loopback only)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def admin_status(demo: Demo) -> dict[str, Any]:
    """GET /admin/status over the demo daemon's admin socket."""
    status: dict[str, Any] = AdminClient(demo.dir / "state" / "admin.sock").call("GET", "/admin/status")
    return status


@contextmanager
def no_loop_stall(demo: Demo) -> Iterator[None]:
    """Fails if the daemon's event loop stalled (over 100 ms late) while the block ran."""
    before = admin_status(demo)["loop_lag"]["stalls"]
    yield
    lag = admin_status(demo)["loop_lag"]
    assert lag["stalls"] == before, (
        f"event loop stalled {lag['stalls'] - before} time(s), worst {lag['max_ms']} ms"
    )


@pytest.fixture
def replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AdminReplay]:
    """Recorded admin-API payloads (tests/fixtures/admin) served on a real Unix socket.

    The socket is `admin.sock` in the test's own directory, named by a relative path so that
    whatever shows it (the TUI's banner) reads the same in every run.
    """
    monkeypatch.chdir(tmp_path)
    server = AdminReplay("admin.sock").start()
    yield server
    server.stop()


@contextmanager
def tmpfs_dir(fallback: Path) -> Iterator[Path]:
    """A fresh folder on tmpfs (/dev/shm) where there is one, else `fallback`, for tests that make
    and remove 10,000 folders: on these VMs' ext4 that takes 7 and 12 s, on tmpfs 0.05 s."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield fallback
        return
    folder = Path(tempfile.mkdtemp(prefix="lorabox-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def bounded(fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
    """fn(*args) on a daemon thread: the test fails, rather than hangs, if it does not return."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {timeout} s: a hang")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
