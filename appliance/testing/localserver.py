"""Run `lorabox serve` as a child process and wait until it is ready (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .loadclock import LoadClock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_status(url: str) -> int:
    """GET url; the status code, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback only)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


class ServerFailed(RuntimeError):
    pass


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str = ""
    """The metrics listener's `/metrics` (a free port of its own)."""
    start_seconds: float = 0.0

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @classmethod
    def start(
        cls,
        config: Path,
        log_path: Path,
        timeout_s: float = 300,
        kv_cache_gib: int = 1,
        env: dict[str, str] | None = None,
        settings: dict[str, object] | None = None,
        command: list[str] | None = None,
    ) -> LocalServer:
        """`settings` override the config file's, as LORABOX_<NAME> environment variables; `env`
        adds to (or overrides) the environment, e.g. `LORABOX_ENGINE` or `PYTHONPATH`. `command`
        runs instead of `lorabox serve` (given `--config` after it), e.g. the null engine's
        `python -m appliance.testing.nullserve`, or either under `taskset`."""
        port, metrics_port = free_port(), free_port()
        while metrics_port == port:  # the kernel may hand out the same free port twice
            metrics_port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LORABOX_")}
        environment |= {f"LORABOX_{name.upper()}": str(value) for name, value in (settings or {}).items()}
        environment |= {
            "LORABOX_PORT": str(port),
            "LORABOX_METRICS_LISTEN": environment.get("LORABOX_METRICS_LISTEN", f"127.0.0.1:{metrics_port}"),
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "PYTHONUNBUFFERED": "1",
        } | (env or {})
        began = time.monotonic()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*(command or [sys.executable, "-m", "appliance", "serve"]), "--config", str(config)],
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # one process group: the engine core goes down with it
            )
        metrics = environment["LORABOX_METRICS_LISTEN"]
        server = cls(
            f"http://127.0.0.1:{port}", process, log_path, f"http://{metrics}/metrics" if metrics else ""
        )
        # The timeout is of the server's time, less what a busy machine kept its processes waiting
        # for a CPU (a start takes 1-3 minutes on two shared cores); 3 times it in wall time at most.
        clock = LoadClock([process.pid], refresh_s=5.0)
        while http_status(f"{server.url}/readyz") != 200:
            if process.poll() is not None:
                raise ServerFailed(f"lorabox serve exited with {process.returncode}:\n{server.log_tail()}")
            if clock.elapsed_s() > timeout_s or time.monotonic() - began > 3 * timeout_s:
                server.stop()
                raise ServerFailed(
                    f"lorabox serve not ready after {timeout_s} s (less its waits for a CPU; "
                    f"{time.monotonic() - began:.0f} s of wall time):\n{server.log_tail()}"
                )
            time.sleep(0.25)
        server.start_seconds = time.monotonic() - began
        return server

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL everything the server started (its process group), stopped processes too, even
        those whose parent died (vLLM's worker outlives a killed engine core)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
