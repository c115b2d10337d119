"""Throughput of the demo under concurrent clients, with the engine start time.

    .venv/bin/python benchmarks/concurrency.py [--clients 8] [--seconds 20] [--max-tokens 64]

Builds the demo in a temporary directory, starts `lorabox serve`, then runs 1 client and N
clients back to back in the same run (so the ratio is meaningful on a noisy shared machine).
Each client loops over the demo tenants and sends completions until the time is up. Prints
engine start time, requests/s, completion tokens/s, time to first token and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer

PROMPTS = ["Hello, how can I help", "The quick brown fox", "Support tickets and invoices", "What is lorabox?"]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def client_loop(session, url, keys, index, deadline, max_tokens, results):  # type: ignore[no-untyped-def]
    tenants = itertools.cycle(sorted(keys))
    for _ in range(index):
        next(tenants)
    prompts = itertools.cycle(PROMPTS)
    while time.monotonic() < deadline:
        tenant = next(tenants)
        body = {
            "model": tenant,
            "prompt": next(prompts),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.monotonic()
        first_token = None
        tokens = 0
        async with session.post(
            f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}
        ) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if first_token is None and line.startswith(b"data: {") and b'"text": "' in line:
                    first_token = time.monotonic() - started
                if b'"usage": {' in line:
                    tokens = int(line.split(b'"completion_tokens": ')[1].split(b",")[0])
        results.append((time.monotonic() - started, first_token or 0.0, tokens))


async def run(
    url: str, keys: dict[str, str], clients: int, seconds: float, max_tokens: int
) -> dict[str, float]:
    results: list[tuple[float, float, int]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        began = time.monotonic()
        deadline = began + seconds
        await asyncio.gather(
            *(client_loop(session, url, keys, i, deadline, max_tokens, results) for i in range(clients))
        )
        wall = time.monotonic() - began
    latencies = [r[0] for r in results]
    ttfts = [r[1] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "req_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "latency_p50_ms": percentile(latencies, 50) * 1000,
        "latency_p95_ms": percentile(latencies, 95) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp)
        init_began = time.monotonic()
        keys = init_demo(demo_dir)
        print(f"demo init: {time.monotonic() - init_began:.1f} s")
        server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server.log")
        print(f"engine start (spawn to /readyz 200): {server.start_seconds:.1f} s")
        try:
            asyncio.run(run(server.url, keys, 2, 3, args.max_tokens))  # warm-up
            single = asyncio.run(run(server.url, keys, 1, args.seconds, args.max_tokens))
            many = asyncio.run(run(server.url, keys, args.clients, args.seconds, args.max_tokens))
        finally:
            server.stop()
    for row in (single, many):
        print("  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    print(f"tokens/s ratio {args.clients} clients vs 1: {many['tokens_per_s'] / single['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
