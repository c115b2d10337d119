"""Several boxes, as docs/scaling.md sets them up: two real lorabox daemons (llama.cpp, light and
quick to start) on loopback ports sharing one real `redis-server` (`limits_backend`; box1 fails
open, box2 closed), the second box's adapters rsync'd from the first's with the documented flags
and its tenants, keys and policies copied with `lorabox fleet export | fleet import`, behind a real
nginx running the doc's own configuration: round robin, and consistent hash by key.

Round robin: a tenant's rate limit and quota hold once for the fleet; Redis stopped, each fail
mode does what it says; Redis back, shared counting resumes. An endpoint picker written from the
inference gateway's LoRA-affinity rule, reading both boxes' model server protocol metrics, sends a
tenant where its adapter runs. Hash by key: one key's requests stick to one box, and stopping that
box moves them to the other with no failed request beyond those in flight (last: it stops a box).
The counters themselves are tested in one process in test_limits_redis.py."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from appliance.demo.build import init_demo
from appliance.tenancy.redislimits import key as redis_key
from appliance.testing.localserver import LocalServer, ServerFailed
from appliance.testing.redisserver import RedisServer
from tests.conftest import SERVER_START_TIMEOUT_S, Demo, Server, post_json
from tests.dedicated import usage_rows
from tests.heldstreams import held_streams, in_flight_scrape, lora_info, scrape
from tests.nginxfront import DOC, REPO, running_nginx

TENANT = "acme"  # no limits: the failover, picker and outage tests' tenant
REQUEST = {"model": TENANT, "prompt": "Hello", "max_tokens": 4, "temperature": 0}
RPM = 10
RATE_LIMITED = "globex"  # --rpm 10
QUOTA = 60
QUOTA_LIMITED = "initech"  # --quota-tokens 60


def lorabox(config: Path, *args: str, stdin: str | None = None) -> str:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--config", str(config)],
        input=stdin,
        text=True,
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed (install.sh's dev tools install it)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def boxes(
    demo: Demo, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """box1 (limits_fail_mode = open) and box2 (closed), both on the module's Redis. box2's
    adapters are rsync'd from box1's; the policies are set on box1 and reach box2, with box1's
    keys, by `lorabox fleet export | fleet import`, as docs/scaling.md says."""
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
    lorabox(first.config, "tenant", "set", RATE_LIMITED, "--rpm", str(RPM))
    lorabox(first.config, "tenant", "set", QUOTA_LIMITED, "--quota-tokens", str(QUOTA))
    lorabox(second.config, "fleet", "import", stdin=lorabox(first.config, "fleet", "export"))
    second.keys = dict(first.keys)  # the same keys work on both: their hashes were imported

    started: list[Server] = []
    failures: list[BaseException] = []

    def start(box: Demo, box_id: str, fail_mode: str) -> None:
        env = {
            "LORABOX_ENGINE": "llamacpp",
            "LORABOX_LIMITS_BACKEND": redis_server.url,
            "LORABOX_LIMITS_FAIL_MODE": fail_mode,
            "LORABOX_BOX_ID": box_id,
        }
        try:
            local = LocalServer.start(
                box.config, box.dir / "server.log", timeout_s=SERVER_START_TIMEOUT_S, env=env
            )
            started.append(Server(local, box))
        except ServerFailed as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=start, args=args)
        for args in ((first, "box1", "open"), (second, "box2", "closed"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if failures:
            pytest.fail(str(failures[0]))
        yield sorted(started, key=lambda server: demos.index(server.demo))
    finally:
        for server in started:
            server.local.kill()


@pytest.fixture(scope="module")
def nginx(boxes: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The doc's consistent-hash upstream."""
    upstreams = [server.url.removeprefix("http://") for server in boxes]
    with running_nginx(tmp_path_factory.mktemp("nginx"), upstreams, "hash") as url:
        yield url


@pytest.fixture(scope="module")
def round_robin(boxes: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The doc's round-robin upstream."""
    upstreams = [server.url.removeprefix("http://") for server in boxes]
    with running_nginx(tmp_path_factory.mktemp("nginx-rr"), upstreams, "round robin") as url:
        yield url


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.05)


def served(boxes: list[Server]) -> list[int]:
    """The tenant's requests each box's usage ledger holds."""
    return [
        sum(1 for row in usage_rows(s.demo) if row["tenant"] == TENANT and row["status"] == 200)
        for s in boxes
    ]


def served_since(boxes: list[Server], before: list[int], at_least: int, timeout_s: float = 15) -> list[int]:
    """The tenant's requests each box's ledger booked since `before`, once they add up to `at_least`."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [now - then for now, then in zip(served(boxes), before, strict=True)]
        if sum(counts) >= at_least or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


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


def redis_now(server: RedisServer) -> float:
    """Redis's own clock, the one its token buckets refill by."""
    seconds, micros = redis.Redis.from_url(server.url).time()
    return seconds + micros / 1e6


def statuses(server: Server, tenant: str) -> Counter[str]:
    """The box's `lorabox_requests_total` for the tenant, by HTTP status (its own telemetry)."""
    counts: Counter[str] = Counter()
    for sample in scrape(server.local.metrics_url)["lorabox_requests"].samples:
        if sample.name == "lorabox_requests_total" and sample.labels["tenant"] == tenant:
            counts[sample.labels["status"]] += int(sample.value)
    return counts


def completion(url: str, key: str, model: str, max_tokens: int = 1) -> tuple[int, Any]:
    body = {"model": model, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}
    return post_json(f"{url}/v1/completions", body, key=key)


# -- the endpoint picker's view -------------------------------------------------------------------


def lora_affinity(info: dict[str, Any], model: str) -> float:
    """The inference gateway's `lora-affinity-scorer`, as its source states the rule
    (kubernetes-sigs/gateway-api-inference-extension, pkg/epp/scheduling/framework/plugins/
    loraaffinityscorer/lora_affinity.go) over the protocol's `vllm:lora_requests_info`
    (docs/proposals/003-model-server-protocol): 1.0 when the requested adapter is running there;
    0.8 when the box has room for one more adapter (running + waiting adapters < max_lora); 0.6 when
    it is waiting there; else 0. (So room ranks above waiting, unlike a plain "running, waiting,
    room" order.)"""
    if model in info["running"]:
        return 1.0
    if len(info["running"]) + len(info["waiting"]) < info["max_lora"]:
        return 0.8
    if model in info["waiting"]:
        return 0.6
    return 0.0


def pick(scrapes: list[dict[str, Any]], model: str) -> int:
    """The box a picker sends `model` to: the best LoRA affinity; among equals the shorter queue
    (`queue-scorer`: `vllm:num_requests_waiting`), then the emptier KV cache
    (`kv-cache-utilization-scorer`: `vllm:kv_cache_usage_perc`)."""

    def score(families: dict[str, Any]) -> tuple[float, float, float]:
        waiting = families["vllm:num_requests_waiting"].samples[0].value
        usage = families["vllm:kv_cache_usage_perc"].samples[0].value
        return lora_affinity(lora_info(families), model), -waiting, -usage

    return max(range(len(scrapes)), key=lambda index: score(scrapes[index]))


def test_a_picker_reading_both_boxes_sends_the_tenant_where_its_adapter_runs(boxes: list[Server]) -> None:
    """acme streams on the second box: the LoRA-affinity rule over both boxes' live metrics picks
    that box for acme (not the first, which a picker reading nothing would take), and the other
    one for a tenant running nowhere."""
    busy = 1
    box, key = boxes[busy], boxes[busy].demo.keys[TENANT]
    taken = in_flight_scrape(
        lambda: [scrape(server.local.metrics_url) for server in boxes],
        lambda: TENANT in lora_info(scrape(box.local.metrics_url))["running"],
        lambda: held_streams(box.url, key, TENANT, count=1),  # one: its 400 tokens are read to the end
    )
    assert [TENANT in lora_info(families)["running"] for families in taken] == [False, True]
    assert pick(taken, TENANT) == busy
    assert pick(taken, RATE_LIMITED) == 1 - busy  # running nowhere: the less loaded box


# -- limits and quotas across the fleet -----------------------------------------------------------


def test_round_robin_a_tenant_gets_its_rpm_once_for_the_fleet(
    boxes: list[Server], round_robin: str, redis_server: RedisServer
) -> None:
    """rpm 10 behind round robin: 10 successes in all (and what the bucket refilled meanwhile, by
    Redis's clock), not 10 per box; both boxes served and both refused."""
    key = boxes[0].demo.keys[RATE_LIMITED]
    began = redis_now(redis_server)
    answers = [completion(round_robin, key, RATE_LIMITED)[0] for _ in range(2 * RPM + 4)]
    elapsed = redis_now(redis_server) - began
    refilled = int(elapsed * RPM / 60)
    assert RPM <= answers.count(200) <= RPM + refilled, (answers, elapsed)
    assert RPM + refilled < 2 * RPM, f"took {elapsed:.0f} s: too slow to tell one bucket from two"
    assert set(answers) == {200, 429}, answers
    per_box = [statuses(server, RATE_LIMITED) for server in boxes]
    assert all(counts["200"] >= 1 and counts["429"] >= 1 for counts in per_box), per_box


def test_round_robin_a_tenant_quota_holds_across_boxes(boxes: list[Server], round_robin: str) -> None:
    """A quota of 60 tokens: the two boxes' ledgers together book at most 60 for the tenant,
    and once it is spent both boxes refuse (insufficient_quota). With a quota per box they would
    book up to 120."""
    key = boxes[0].demo.keys[QUOTA_LIMITED]
    successes, refusals = 0, list[tuple[int, str]]()
    for _ in range(80):
        status, body = completion(round_robin, key, QUOTA_LIMITED, max_tokens=4)
        if status == 200:
            successes += 1
            refusals = []
        else:
            refusals.append((status, body["error"]["code"]))
            if len(refusals) == 4:  # two rounds of both boxes
                break
    assert refusals == [(429, "insufficient_quota")] * 4, refusals

    def booked() -> list[list[dict[str, Any]]]:
        return [
            [r for r in usage_rows(server.demo) if r["tenant"] == QUOTA_LIMITED and r["status"] == 200]
            for server in boxes
        ]

    wait_until(lambda: sum(map(len, booked())) == successes, "every success in a ledger")
    rows = booked()
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for box in rows for r in box)
    assert all(rows), [len(box) for box in rows]  # both boxes served the tenant
    assert tokens <= QUOTA, (tokens, successes)
    assert {r["box_id"] for box in rows for r in box} == {"box1", "box2"}
    assert all(statuses(server, QUOTA_LIMITED)["429"] >= 1 for server in boxes)


def readyz(server: Server) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=10) as response:  # noqa: S310
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def shared(server: Server) -> bool:
    """Ready, and not degraded: its shared counters answer."""
    status, body = readyz(server)
    return status == 200 and "degraded" not in body


def outage_lines(server: Server) -> int:
    return server.local.log_path.read_text(errors="replace").count("shared limits unavailable:")


def shares_in_redis(server: RedisServer, tenant: str) -> dict[str, int]:
    """The tokens each box's requests used this month, as Redis holds them (box id -> tokens)."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    months = client.keys(redis_key(tenant, "used:month:*"))
    assert len(months) <= 1, months
    return {str(box): int(tokens) for month in months for box, tokens in client.hgetall(month).items()}


def shares_in_ledgers(boxes: list[Server], tenant: str) -> dict[str, int]:
    """The same from each box's own usage ledger."""
    shares: Counter[str] = Counter()
    for server in boxes:
        for row in usage_rows(server.demo):
            if row["tenant"] == tenant:
                shares[row["box_id"]] += row["prompt_tokens"] + row["completion_tokens"]
    return {box: tokens for box, tokens in shares.items() if tokens}


def test_redis_stopped_each_fail_mode_then_shared_counting_resumes(
    boxes: list[Server], round_robin: str, redis_server: RedisServer
) -> None:
    """Redis stops: box1 (open) serves on its own counters and says so once in its log and in
    /readyz; box2 (closed) answers 503 limits_unavailable. Redis comes back empty (a restart without
    persistence): each box writes back its share of the month's tokens, from its own ledger, what
    box1 served during the outage included; box2 serves again through nginx."""
    opened, closed = boxes
    key = opened.demo.keys[TENANT]
    for _ in range(2):  # some use by both boxes, counted in Redis
        assert completion(round_robin, key, TENANT)[0] == 200
    before = [outage_lines(server) for server in boxes]
    redis_server.stop()
    try:
        for _ in range(3):
            status, body = completion(opened.url, key, TENANT)
            assert status == 200, body
            status, body = completion(closed.url, key, TENANT)
            assert (status, body["error"]["code"]) == (503, "limits_unavailable"), body
        assert [outage_lines(server) - b for server, b in zip(boxes, before, strict=True)] == [1, 1]
        status, body = readyz(opened)
        assert status == 200, body
        assert "counting on this box alone" in body["degraded"]
        status, body = readyz(closed)
        assert (status, body["status"]) == (503, "refusing"), body
    finally:
        redis_server.start()
    wait_until(lambda: all(shared(server) for server in boxes), "both boxes sharing again")
    ledgers = shares_in_ledgers(boxes, TENANT)
    assert set(ledgers) == {"box1", "box2"}, ledgers
    wait_until(lambda: shares_in_redis(redis_server, TENANT) == ledgers, "each box's share back in Redis")

    served_before = [statuses(server, TENANT)["200"] for server in boxes]
    for _ in range(4):
        assert completion(round_robin, key, TENANT)[0] == 200
    served = [statuses(s, TENANT)["200"] - b for s, b in zip(boxes, served_before, strict=True)]
    assert served == [2, 2], served  # round robin: box2 serves again, counting in Redis
    assert shares_in_redis(redis_server, TENANT) == shares_in_ledgers(boxes, TENANT)


def test_one_key_sticks_to_one_box_and_moves_when_that_box_stops(boxes: list[Server], nginx: str):
    key = boxes[0].demo.keys[TENANT]
    before = served(boxes)  # earlier tests' requests
    for _ in range(8):
        status, body = post_json(f"{nginx}/v1/completions", REQUEST, key=key)
        assert status == 200, body
    counts = served_since(boxes, before, at_least=8)
    assert sorted(counts) == [0, 8], counts  # affinity: every request on the same box
    home, other = (boxes[0], boxes[1]) if counts[0] else (boxes[1], boxes[0])
    other_before = served([other])

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
    moved = served_since([other], other_before, at_least=len(after))[0]
    assert moved >= len(after)  # served by the other box: it was the only one left
