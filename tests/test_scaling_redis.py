"""Two boxes as a fleet: real lorabox daemons (llama.cpp, loopback ports) sharing one real
`redis-server` (`limits_backend`), keys and policies copied with `lorabox fleet export | import`,
behind a real nginx running docs/scaling.md's round-robin configuration.

What these add to test_limits_redis.py (which proves the counters themselves, in one process):
the daemons' wiring through HTTP and nginx, a tenant's rate limit and quota counted once for the
fleet, each fail mode as a client and the log see it, and an endpoint picker's view of the two
boxes' model server protocol metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
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
from tests.nginxfront import REPO, running_nginx

pytestmark = pytest.mark.skipif(
    not RedisServer.available() or shutil.which("nginx") is None, reason="needs redis-server and nginx"
)

RPM = 10
RATE_LIMITED = "globex"  # --rpm 10
QUOTA = 60
QUOTA_LIMITED = "initech"  # --quota-tokens 60
STREAMING = "acme"  # no limits: the picker test's tenant


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
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fleet(
    demo: Demo, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Server]]:
    """box1 (limits_fail_mode = open) and box2 (closed), both on the module's Redis. The policies
    are set on box1 and reach box2, with box1's keys, by `lorabox fleet export | fleet import`."""
    demos = []
    for name in ("box1", "box2"):
        directory = tmp_path_factory.mktemp(name)
        shutil.copytree(demo.model_dir, directory / "model")
        shutil.copy2(demo.dir / "model.gguf", directory / "model.gguf")
        demos.append(Demo(directory, init_demo(directory)))
    first, second = demos
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
def nginx(fleet: list[Server], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    upstreams = [server.url.removeprefix("http://") for server in fleet]
    with running_nginx(tmp_path_factory.mktemp("nginx"), upstreams, "round robin") as url:
        yield url


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


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.05)


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


def test_a_picker_reading_both_boxes_sends_the_tenant_where_its_adapter_runs(fleet: list[Server]) -> None:
    """acme streams on the second box: the LoRA-affinity rule over both boxes' live metrics picks
    that box for acme (not the first, which a picker reading nothing would take), and the other
    one for a tenant running nowhere."""
    busy = 1
    box, key = fleet[busy], fleet[busy].demo.keys[STREAMING]
    taken = in_flight_scrape(
        lambda: [scrape(server.local.metrics_url) for server in fleet],
        lambda: STREAMING in lora_info(scrape(box.local.metrics_url))["running"],
        lambda: held_streams(box.url, key, STREAMING),
    )
    assert [STREAMING in lora_info(families)["running"] for families in taken] == [False, True]
    assert pick(taken, STREAMING) == busy
    assert pick(taken, RATE_LIMITED) == 1 - busy  # running nowhere: the less loaded box


# -- limits and quotas across the fleet -----------------------------------------------------------


def test_round_robin_a_tenant_gets_its_rpm_once_for_the_fleet(
    fleet: list[Server], nginx: str, redis_server: RedisServer
) -> None:
    """rpm 10 behind round robin: 10 successes in all (and what the bucket refilled meanwhile, by
    Redis's clock), not 10 per box; both boxes served and both refused."""
    key = fleet[0].demo.keys[RATE_LIMITED]
    began = redis_now(redis_server)
    answers = [completion(nginx, key, RATE_LIMITED)[0] for _ in range(2 * RPM + 4)]
    elapsed = redis_now(redis_server) - began
    refilled = int(elapsed * RPM / 60)
    assert RPM <= answers.count(200) <= RPM + refilled, (answers, elapsed)
    assert RPM + refilled < 2 * RPM, f"took {elapsed:.0f} s: too slow to tell one bucket from two"
    assert set(answers) == {200, 429}, answers
    per_box = [statuses(server, RATE_LIMITED) for server in fleet]
    assert all(counts["200"] >= 1 and counts["429"] >= 1 for counts in per_box), per_box


def test_round_robin_a_tenant_quota_holds_across_boxes(fleet: list[Server], nginx: str) -> None:
    """A quota of 60 tokens: the two boxes' ledgers together book at most 60 for the tenant,
    and once it is spent both boxes refuse (insufficient_quota). With a quota per box they would
    book up to 120."""
    key = fleet[0].demo.keys[QUOTA_LIMITED]
    successes, refusals = 0, list[tuple[int, str]]()
    for _ in range(80):
        status, body = completion(nginx, key, QUOTA_LIMITED, max_tokens=4)
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
            for server in fleet
        ]

    wait_until(lambda: sum(map(len, booked())) == successes, "every success in a ledger")
    rows = booked()
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for box in rows for r in box)
    assert all(rows), [len(box) for box in rows]  # both boxes served the tenant
    assert tokens <= QUOTA, (tokens, successes)
    assert {r["box_id"] for box in rows for r in box} == {"box1", "box2"}
    assert all(statuses(server, QUOTA_LIMITED)["429"] >= 1 for server in fleet)


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


def shares_in_ledgers(fleet: list[Server], tenant: str) -> dict[str, int]:
    """The same from each box's own usage ledger."""
    shares: Counter[str] = Counter()
    for server in fleet:
        for row in usage_rows(server.demo):
            if row["tenant"] == tenant:
                shares[row["box_id"]] += row["prompt_tokens"] + row["completion_tokens"]
    return {box: tokens for box, tokens in shares.items() if tokens}


def test_redis_stopped_each_fail_mode_then_shared_counting_resumes(
    fleet: list[Server], nginx: str, redis_server: RedisServer
) -> None:
    """Redis stops: box1 (open) serves on its own counters and says so once in its log and in
    /readyz; box2 (closed) answers 503 limits_unavailable. Redis comes back empty (a restart without
    persistence): each box writes back its share of the month's tokens, from its own ledger, what
    box1 served during the outage included; box2 serves again through nginx."""
    opened, closed = fleet
    key = opened.demo.keys[STREAMING]
    for _ in range(2):  # some use by both boxes, counted in Redis
        assert completion(nginx, key, STREAMING)[0] == 200
    before = [outage_lines(server) for server in fleet]
    redis_server.stop()
    try:
        for _ in range(3):
            status, body = completion(opened.url, key, STREAMING)
            assert status == 200, body
            status, body = completion(closed.url, key, STREAMING)
            assert (status, body["error"]["code"]) == (503, "limits_unavailable"), body
        assert [outage_lines(server) - b for server, b in zip(fleet, before, strict=True)] == [1, 1]
        status, body = readyz(opened)
        assert status == 200, body
        assert "counting on this box alone" in body["degraded"]
        status, body = readyz(closed)
        assert (status, body["status"]) == (503, "refusing"), body
    finally:
        redis_server.start()
    wait_until(lambda: all(shared(server) for server in fleet), "both boxes sharing again")
    ledgers = shares_in_ledgers(fleet, STREAMING)
    assert set(ledgers) == {"box1", "box2"}, ledgers
    wait_until(lambda: shares_in_redis(redis_server, STREAMING) == ledgers, "each box's share back in Redis")

    served_before = [statuses(server, STREAMING)["200"] for server in fleet]
    for _ in range(4):
        assert completion(nginx, key, STREAMING)[0] == 200
    served = [statuses(s, STREAMING)["200"] - b for s, b in zip(fleet, served_before, strict=True)]
    assert served == [2, 2], served  # round robin: box2 serves again, counting in Redis
    assert shares_in_redis(redis_server, STREAMING) == shares_in_ledgers(fleet, STREAMING)
