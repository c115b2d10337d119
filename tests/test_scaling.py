"""Several boxes behind nginx, as docs/scaling.md sets them up: two real lorabox instances (llama.cpp,
light and quick to start) on loopback ports, the second one's adapters rsync'd from the first's
with the documented flags and the tenant's key imported, behind a real nginx running the doc's own
configuration. One key's requests stick to one box; stopping that box moves them to the other with
no failed request beyond those in flight."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from appliance.demo.build import init_demo
from appliance.testing.localserver import ServerFailed
from tests.conftest import Demo, Server, post_json, start_llamacpp
from tests.dedicated import usage_rows
from tests.nginxfront import DOC, REPO, running_nginx

TENANT = "acme"
REQUEST = {"model": TENANT, "prompt": "Hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def boxes(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Box one: a demo copy. Box two: another, its adapters rsync'd from box one's and box one's
    key for the tenant imported, as docs/scaling.md says."""
    demos = []
    for name in ("box1", "box2"):
        directory = tmp_path_factory.mktemp(name)
        shutil.copytree(demo.model_dir, directory / "model")
        shutil.copy2(demo.dir / "model.gguf", directory / "model.gguf")
        demos.append(Demo(directory, init_demo(directory)))
    first, second = demos
    shutil.rmtree(second.dir / "adapters")
    (second.dir / "adapters").mkdir()
    subprocess.run(
        [
            "rsync",
            "-rt",
            "--delay-updates",
            "--delete-delay",
            f"{first.dir / 'adapters'}/",
            f"{second.dir / 'adapters'}/",
        ],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "appliance", "key", "import", TENANT, "--config", str(second.config)],
        input=first.keys[TENANT] + "\n",
        text=True,
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    second.keys[TENANT] = first.keys[TENANT]

    started: list[Server] = []
    failures: list[BaseException] = []

    def start(box: Demo) -> None:
        try:
            started.append(Server(start_llamacpp(box), box))
        except ServerFailed as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(box,)) for box in demos]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if failures:
            pytest.fail(str(failures[0]))
        yield sorted(started, key=lambda server: str(server.demo.dir))
    finally:
        for server in started:
            server.local.kill()


@pytest.fixture(scope="module")
def nginx(boxes: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    upstreams = [server.url.removeprefix("http://") for server in boxes]
    with running_nginx(tmp_path_factory.mktemp("nginx"), upstreams, "hash") as url:
        yield url


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.05)


def served_by(boxes: list[Server], at_least: int, timeout_s: float = 15) -> list[int]:
    """The tenant's requests in each box's usage ledger, once they add up to `at_least`."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [
            sum(1 for row in usage_rows(s.demo) if row["tenant"] == TENANT and row["status"] == 200)
            for s in boxes
        ]
        if sum(counts) >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def test_one_key_sticks_to_one_box_and_moves_when_that_box_stops(boxes: list[Server], nginx: str):
    key = boxes[0].demo.keys[TENANT]
    for _ in range(8):
        status, body = post_json(f"{nginx}/v1/completions", REQUEST, key=key)
        assert status == 200, body
    counts = served_by(boxes, at_least=8)
    assert sorted(counts) == [0, 8], counts  # affinity: every request on the same box
    home, other = (boxes[0], boxes[1]) if counts[0] else (boxes[1], boxes[0])

    results: list[tuple[float, float, int, object]] = []  # (sent, answered, status, body)
    stop_clients = threading.Event()

    def client() -> None:
        while not stop_clients.is_set():
            sent = time.monotonic()
            status, body = post_json(f"{nginx}/v1/completions", REQUEST, key=key)
            results.append((sent, time.monotonic(), status, body))

    def answered_since(moment: float) -> int:
        return len([r for r in list(results) if r[0] > moment])

    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for thread in clients:
        thread.start()
    # Counts of requests, not seconds: a loaded machine answers fewer in a given time.
    wait_until(lambda: answered_since(0) >= 4, "requests before the stop")
    stopping_at = time.monotonic()
    home.local.stop()  # SIGTERM, as systemctl stop: drains, then exits
    stopped_at = time.monotonic()
    assert home.local.process.returncode == 0
    wait_until(lambda: answered_since(stopped_at) >= 4, "requests after the stop")
    stop_clients.set()
    for thread in clients:
        thread.join(60)

    failed = [r for r in results if r[2] != 200]
    in_flight = [r for r in failed if r[0] < stopping_at < r[1]]
    print(
        f"failover: {len(results)} requests, {len(failed)} failed ({len(in_flight)} in flight at the stop),"
        f" stop took {stopped_at - stopping_at:.2f} s"
    )
    assert failed == in_flight, failed
    after = [r for r in results if r[0] > stopped_at]
    assert len(after) >= 4, len(results)
    assert all(r[2] == 200 for r in after)
    moved = served_by([other], at_least=len(after))[0]
    assert moved >= len(after)  # served by the other box: it was the only one left


def test_the_sizing_table_is_the_planners_arithmetic():
    """docs/scaling.md's table is what benchmarks/sizing.py prints from residency.py today."""
    printed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "sizing.py")],
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 5, printed
    documented = DOC.read_text().splitlines()
    start = documented.index(table[0])
    assert documented[start : start + len(table)] == table


class RecordingUpstream(ThreadingHTTPServer):
    """A stand-in box that answers 200 to anything and keeps every path it was sent."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                upstream.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


def raw_get(url: str, path: str) -> int:
    """GET `path` exactly as written (no client-side normalisation of `..` or escapes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: lorabox\r\nConnection: close\r\n\r\n".encode())
        head = conn.recv(4096).decode("latin-1")
    return int(head.split()[1])


def test_the_documented_nginx_block_passes_the_api_on_and_never_metrics(tmp_path: Path):
    """Against stand-in boxes that would answer anything: /metrics (however spelt) never reaches
    them; the API and the health checks do."""
    upstreams = [RecordingUpstream(), RecordingUpstream()]
    try:
        with running_nginx(tmp_path, [u.address for u in upstreams]) as url:
            for path in ("/v1/models", "/readyz"):
                assert raw_get(url, path) == 200, path
            for path in (
                "/metrics",
                "/metrics?x=1",
                "/v1/../metrics",
                "/%6Detrics",
                "//metrics",
                "/v1/%2e%2e/metrics",
            ):
                assert raw_get(url, path) == 404, path
            for path in ("/admin/status", "/", "/healthzz"):
                assert raw_get(url, path) == 404, path
    finally:
        for upstream in upstreams:
            upstream.shutdown()
    sent = [path for upstream in upstreams for path in upstream.paths]
    assert not [path for path in sent if "etrics" in path], sent
    assert "/v1/models" in sent
