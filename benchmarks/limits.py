"""What the shared limits backend costs on admission: local counters against Redis, in one run.

    .venv/bin/python -m benchmarks.limits [--rounds 3] [--admissions 2000] [--clients 16]
                                          [--e2e-clients 4] [--seconds 10] [--engine llamacpp]

1. Admission alone, in this process: `Admission.admit` (local counters) against `admit_shared`
   (a real redis-server on loopback, started here), for a tenant with every limit set (rpm, tpm
   and a quota: the scripts do all their work). One at a time (the latency one request's admission
   adds: p50 and p99) and `--clients` at once (admissions per second).
2. End to end: two `lorabox serve` on copies of the demo, one with `limits_backend = "local"`,
   one with the Redis; `--e2e-clients` closed-loop clients sending one-token completions to each
   in turn (rounds alternate, so a machine getting busier weighs on both alike): requests/s, p50
   and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from appliance.demo.build import init_demo
from appliance.tenancy.admission import Admission
from appliance.tenancy.policy import Policy
from appliance.tenancy.policybook import PolicyBook
from appliance.tenancy.quota import QuotaMeter
from appliance.tenancy.redislimits import RedisLimits
from appliance.tenancy.scheduler import FairScheduler
from appliance.testing.localserver import LocalServer
from appliance.testing.redisserver import RedisServer

TENANT = "acme"
LIMITS = {"rpm": 1_000_000, "tpm": 1_000_000_000, "quota_tokens": 10**15}  # never reached, always checked


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(latencies_s: list[float], elapsed_s: float) -> dict[str, float]:
    return {
        "per_s": len(latencies_s) / elapsed_s,
        "p50_ms": percentile(latencies_s, 0.50) * 1000,
        "p99_ms": percentile(latencies_s, 0.99) * 1000,
    }


# -- 1. admission alone -------------------------------------------------------------------------


async def admissions(
    admission: Admission, limits: RedisLimits | None, count: int, clients: int
) -> dict[str, float]:
    """`count` admissions (each settled at once, as a one-token request would be) by `clients` at
    a time; with `limits`, through Redis. A Redis round counts only if Redis answered every take
    in time: one that fell back to the local counters (the fail mode) is reported, not measured."""
    latencies: list[float] = []
    outages = limits.outages if limits else 0

    async def client(n: int) -> None:
        for _ in range(n):
            began = time.perf_counter()
            if limits is not None:
                ticket = await admission.admit_shared(TENANT, 20, 20, TENANT)
            else:
                ticket = admission.admit(TENANT, 20, 20, TENANT)
            latencies.append(time.perf_counter() - began)
            ticket.finish(20, 20)  # settles (for Redis: in the background, as the daemon does)

    began = time.perf_counter()
    await asyncio.gather(*[client(count // clients) for _ in range(clients)])
    result = summary(latencies, time.perf_counter() - began)
    if limits is not None:
        # Settled, and answering, before the next round (a set of tasks and a probe: no event to await).
        while limits._tasks or limits.down is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        result["fell_back"] = float(limits.outages - outages)
    return result


async def in_process(
    redis_url: str, args: argparse.Namespace
) -> dict[str, dict[str, list[dict[str, float]]]]:
    def admission(limits: RedisLimits | None, quota: QuotaMeter) -> Admission:
        book = PolicyBook(Policy(), {TENANT: LIMITS})
        return Admission(book, quota, FairScheduler(max_running=10**6, max_queued=10**6), shared=limits)

    quota = QuotaMeter()
    limits = RedisLimits(redis_url, "bench", quota, fail_open=True)
    context = limits.running()
    await anext(context)
    while limits.down is not None:  # noqa: ASYNC110 (its first probe; no event to await)
        await asyncio.sleep(0.01)
    gates = {"local": (admission(None, QuotaMeter()), None), "redis": (admission(limits, quota), limits)}
    results: dict[str, dict[str, list[dict[str, float]]]] = {"one at a time": {}, "concurrent": {}}
    try:
        for _ in range(args.rounds):
            for name, (gate, shared) in gates.items():
                for kind, clients in (("one at a time", 1), ("concurrent", args.clients)):
                    result = await admissions(gate, shared, args.admissions, clients)
                    fell_back = result.pop("fell_back", 0)
                    note = ""
                    if fell_back:
                        note = "  Redis did not answer in time: fell back to local counters, not counted"
                    else:
                        results[kind].setdefault(name, []).append(result)
                    print(
                        f"  {kind:<13} {name:<5} {result['per_s']:9.0f} admissions/s  p50 "
                        f"{result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms{note}",
                        flush=True,
                    )
    finally:
        await anext(context, None)
    return results


# -- 2. end to end ------------------------------------------------------------------------------


async def load(url: str, key: str, clients: int, seconds: float) -> dict[str, float]:
    body = {"model": TENANT, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    await response.read()
                    assert response.status == 200, response.status
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(clients)])
        return summary(latencies, time.perf_counter() - began)


def end_to_end(root: Path, redis_url: str, args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    servers: dict[str, LocalServer] = {}
    keys: dict[str, str] = {}
    try:
        for name, backend in (("local", "local"), ("redis", redis_url)):
            directory = root / name
            keys[name] = init_demo(directory)[TENANT]
            config = directory / "lorabox.toml"
            subprocess.run(
                [sys.executable, "-m", "appliance", "tenant", "set", TENANT, "--config", str(config)]
                + [
                    arg
                    for field, value in LIMITS.items()
                    for arg in (f"--{field.replace('_', '-')}", str(value))
                ],
                check=True,
                capture_output=True,
            )
            env = {"LORABOX_ENGINE": args.engine, "LORABOX_LIMITS_BACKEND": backend}
            servers[name] = LocalServer.start(config, directory / "server.log", env=env)
        results: dict[str, list[dict[str, float]]] = {"local": [], "redis": []}
        for name in servers:  # warm-up
            asyncio.run(load(servers[name].url, keys[name], args.e2e_clients, 2))
        for index in range(2 * args.rounds):
            name = ("local", "redis")[(index + index // 2) % 2]  # l r r l l r
            result = asyncio.run(load(servers[name].url, keys[name], args.e2e_clients, args.seconds))
            results[name].append(result)
            print(
                f"  end to end    {name:<5} {result['per_s']:9.1f} requests/s    "
                f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms",
                flush=True,
            )
        fallbacks = servers["redis"].log_path.read_text(errors="replace").count("shared limits unavailable")
        if fallbacks:
            print(f"  the Redis box fell back to local counters {fallbacks} time(s): included above")
        return results
    finally:
        for server in servers.values():
            server.stop()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--admissions", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--e2e-clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--engine", default="llamacpp", choices=("llamacpp", "vllm"))
    parser.add_argument("--skip-end-to-end", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-limits-") as tmp:
        root = Path(tmp)
        redis = RedisServer(root / "redis").start()
        try:
            print("1. admission alone, this process:", flush=True)
            alone = asyncio.run(in_process(redis.url, args))
            report: dict[str, Any] = {
                kind: {name: median_of(runs) for name, runs in by_name.items()}
                for kind, by_name in alone.items()
            }
            if not args.skip_end_to_end:
                print(
                    f"2. end to end, {args.e2e_clients} clients, one-token completions ({args.engine}):",
                    flush=True,
                )
                runs = end_to_end(root, redis.url, args)
                report["end to end"] = {name: median_of(by_name) for name, by_name in runs.items()}
                # Round i of each ran next to the other's round i (l r, r l, ...): compared in
                # pairs, a machine whose load changes between pairs weighs less.
                pairs = list(zip(runs["local"], runs["redis"], strict=True))
                report["end to end, paired"] = {
                    "rate_ratio": statistics.median(r["per_s"] / loc["per_s"] for loc, r in pairs),
                    "added_p50_ms": statistics.median(r["p50_ms"] - loc["p50_ms"] for loc, r in pairs),
                }
        finally:
            redis.stop()
    print("\nmedians of the rounds:")
    for kind, by_name in report.items():
        if "local" not in by_name:
            print(
                f"  {kind}: redis/local requests/s x{by_name['rate_ratio']:.2f},"
                f" added p50 {by_name['added_p50_ms']:+.2f} ms (medians over the pairs)"
            )
            continue
        local, shared = by_name["local"], by_name["redis"]
        added_p50, added_p99 = shared["p50_ms"] - local["p50_ms"], shared["p99_ms"] - local["p99_ms"]
        rate = shared["per_s"] / local["per_s"]

        def figures(name: str, run: dict[str, float]) -> str:
            return f"{name} {run['per_s']:9.1f}/s p50 {run['p50_ms']:.3f} p99 {run['p99_ms']:.3f} ms"

        print(
            f"  {kind:<13} {figures('local', local)} | {figures('redis', shared)}"
            f" | added p50 {added_p50:+.3f} ms, p99 {added_p99:+.3f} ms, rate x{rate:.2f}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
