"""Drop → first correct response latency, and throughput with 5 vs 200 registered adapters.

    .venv/bin/python benchmarks/adapters.py [--drops 20] [--seconds 15] [--clients 8]

1. A server with 5 tenants: throughput (N clients spread over the 5 tenants).
2. On the same server, `--drops` new tenants are dropped one at a time (built under a dot name,
   then renamed, as operators are told to); each is polled until it answers with exactly the
   HF transformers + PEFT reference output. Prints p50/p95 of rename → first correct answer.
3. A server with 200 tenants registered at start: throughput for the same 5 tenants, and spread
   over all 200. Prints the ratios to run 1 (same machine, same run).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from appliance.demo import DemoTenant, build_adapter, init_demo
from appliance.localserver import LocalServer
from appliance.reference import PeftReference
from appliance.store import Store

PROMPT = "The quick brown fox"
MAX_TOKENS = 32


def add_tenants(demo_dir: Path, names: list[str], seed: int) -> dict[str, str]:
    keys = {}
    with Store.open(demo_dir / "state" / "lorabox.db") as store:
        for i, name in enumerate(names):
            build_adapter(
                demo_dir / "model",
                DemoTenant(name, 8, 16, ("q_proj", "v_proj"), seed + i),
                demo_dir / "adapters" / name / "v1",
            )
            store.add_tenant(name)
            keys[name] = store.issue_key(name).plaintext
    return keys


async def throughput(
    url: str, keys: dict[str, str], tenants: list[str], clients: int, seconds: float
) -> float:
    """Completion tokens per second, clients cycling over `tenants`."""
    tokens = 0
    deadline = time.monotonic() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal tokens
        turn = index
        while time.monotonic() < deadline:
            tenant = tenants[turn % len(tenants)]
            turn += clients
            body = {"model": tenant, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            async with session.post(
                f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}
            ) as response:
                assert response.status == 200, await response.text()
                tokens += (await response.json())["usage"]["completion_tokens"]

    began = time.monotonic()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return tokens / (time.monotonic() - began)


async def drop_latency(url: str, demo_dir: Path, reference: PeftReference, count: int) -> list[float]:
    latencies = []
    prompt_ids = reference.prompt_ids(PROMPT)
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            name = f"drop{i:03d}"
            with Store.open(demo_dir / "state" / "lorabox.db") as store:
                store.add_tenant(name)
                key = store.issue_key(name).plaintext
            staging = demo_dir / "adapters" / name / ".v1.partial"
            build_adapter(
                demo_dir / "model", DemoTenant(name, 8, 16, ("q_proj", "v_proj"), 50_000 + i), staging
            )
            expected = reference.text(reference.generate(staging, prompt_ids, MAX_TOKENS))
            dropped = time.monotonic()
            staging.rename(staging.with_name("v1"))
            body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
            while True:
                async with session.post(
                    f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    if response.status == 200 and (await response.json())["choices"][0]["text"] == expected:
                        break
                await asyncio.sleep(0.01)
            latencies.append(time.monotonic() - dropped)
    return latencies


def warm_up(url: str, keys: dict[str, str], tenants: list[str], clients: int) -> None:
    """Run every batch size once before measuring: the first server of a run otherwise pays the
    engine's one-off kernel compilation inside its measurement (seen as a 2x slower first phase)."""
    width = 1
    while width < clients:
        asyncio.run(throughput(url, keys, tenants, width, 2))
        width *= 2
    asyncio.run(throughput(url, keys, tenants, clients, 3))


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp)
        keys = init_demo(demo_dir) | add_tenants(demo_dir, ["t000", "t001"], 1000)
        five = sorted(keys)
        reference = PeftReference(demo_dir / "model")

        server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server-5.log")
        try:
            warm_up(server.url, keys, five, args.clients)
            tps_5 = asyncio.run(throughput(server.url, keys, five, args.clients, args.seconds))
            latencies = asyncio.run(drop_latency(server.url, demo_dir, reference, args.drops))
        finally:
            server.stop()

        for path in (demo_dir / "adapters").glob("drop*"):  # back to 5, then up to 200
            shutil.rmtree(path)
        keys |= add_tenants(demo_dir, [f"t{i:03d}" for i in range(2, 197)], 1002)
        began = time.monotonic()
        server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server-200.log")
        start_200 = time.monotonic() - began
        try:
            warm_up(server.url, keys, five, args.clients)
            tps_200_same5 = asyncio.run(throughput(server.url, keys, five, args.clients, args.seconds))
            tps_200_all = asyncio.run(throughput(server.url, keys, sorted(keys), args.clients, args.seconds))
        finally:
            server.stop()

    print(
        f"drop → first correct response over {len(latencies)} drops: p50 {pct(latencies, 50) * 1000:.0f} ms, "
        f"p95 {pct(latencies, 95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms"
    )
    print(f"start-up with 200 adapters registered: {start_200:.1f} s")
    print(
        f"tokens/s, {args.clients} clients: 5 registered {tps_5:.0f} | 200 registered, same 5 tenants "
        f"{tps_200_same5:.0f} ({tps_200_same5 / tps_5 - 1:+.1%}) | 200 registered, all 200 tenants "
        f"{tps_200_all:.0f} ({tps_200_all / tps_5 - 1:+.1%})"
    )


if __name__ == "__main__":
    main()
