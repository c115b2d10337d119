"""llama.cpp vs vLLM on the demo model: tokens/s under 1 and N clients, and the cost of an adapter switch.

    .venv/bin/python benchmarks/engines.py [--clients 8] [--seconds 15] [--parallel 1,4,8]

One demo directory, one `lorabox serve` per configuration, run back to back on the same machine:
  * tokens/s with 1 client and with N clients, the clients cycling over the demo tenants (every
    request may need another adapter than the one before), and N clients all on one tenant;
    for llama.cpp once per `llamacpp_parallel` value (how many requests it decodes at once);
  * adapter switch over HTTP: one client, short requests, all on one tenant vs alternating
    between two; the difference of the median latencies is what a switch adds to a request;
  * adapter switch inside the llama.cpp engine (no HTTP): the same comparison on 1-token requests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from concurrency import run  # type: ignore[import-not-found]  # the sibling benchmark

from appliance.demo.build import DEMO_TENANTS, init_demo
from appliance.engines.base import AdapterRef, EngineOptions, GenerationRequest
from appliance.engines.llamacpp import LlamaCppEngine
from appliance.testing.localserver import LocalServer

SWITCH_PROMPT = "The quick brown fox"
SWITCH_REQUESTS = 120
SWITCH_TOKENS = 4


async def sequential_latencies(url: str, keys: dict[str, str], tenants: list[str]) -> list[float]:
    """Median-friendly latencies of SWITCH_REQUESTS requests sent one by one, tenants in turn."""
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(SWITCH_REQUESTS):
            tenant = tenants[i % len(tenants)]
            body = {"model": tenant, "prompt": SWITCH_PROMPT, "max_tokens": SWITCH_TOKENS, "temperature": 0}
            began = time.perf_counter()
            async with session.post(
                f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {keys[tenant]}"}
            ) as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - began)
    return latencies


def switch_cost_ms(same: list[float], alternating: list[float]) -> str:
    a, b = statistics.median(same) * 1000, statistics.median(alternating) * 1000
    return f"same tenant {a:.2f} ms, alternating {b:.2f} ms per request: a switch adds {b - a:+.2f} ms"


def serve_and_measure(demo_dir: Path, keys: dict[str, str], engine: str, parallel: int, args) -> dict:  # type: ignore[no-untyped-def,type-arg]
    log = demo_dir / f"server-{engine}-{parallel}.log"
    env = {"LORABOX_ENGINE": engine, "LORABOX_LLAMACPP_PARALLEL": str(parallel)}
    server = LocalServer.start(demo_dir / "lorabox.toml", log, env=env)
    one = sorted(keys)[:1]
    try:
        asyncio.run(run(server.url, keys, 2, 3, args.max_tokens))  # warm-up
        results = {
            "start_s": server.start_seconds,
            "1 client": asyncio.run(run(server.url, keys, 1, args.seconds, args.max_tokens)),
            f"{args.clients} clients": asyncio.run(
                run(server.url, keys, args.clients, args.seconds, args.max_tokens)
            ),
            f"{args.clients} clients, 1 tenant": asyncio.run(
                run(server.url, {t: keys[t] for t in one}, args.clients, args.seconds, args.max_tokens)
            ),
        }
        tenants = sorted(keys)[:2]
        same = asyncio.run(sequential_latencies(server.url, keys, tenants[:1]))
        alternating = asyncio.run(sequential_latencies(server.url, keys, tenants))
        results["switch"] = switch_cost_ms(same, alternating)
        return results
    finally:
        server.stop()


async def engine_switch_cost(demo_dir: Path) -> str:
    """The llama.cpp engine alone: 1-token requests on one adapter vs alternating two."""
    from transformers import AutoTokenizer

    prompt = list(AutoTokenizer.from_pretrained(demo_dir / "model")(SWITCH_PROMPT).input_ids)
    options = EngineOptions(
        model=str(demo_dir / "model"),
        gguf_model=str(demo_dir / "model.gguf"),
        dtype="float32",
        max_model_len=1024,
        cache_dir=str(demo_dir / "bench-cache"),
    )
    engine = LlamaCppEngine(options)
    await engine.start()
    refs = [AdapterRef(f"{t.name}@v1", str(demo_dir / "adapters" / t.name / "v1")) for t in DEMO_TENANTS[:2]]
    for ref in refs:
        await engine.load_adapter(ref)

    async def timed(adapters: list[AdapterRef]) -> list[float]:
        times = []
        for i in range(400):
            request = GenerationRequest("b", prompt, 1, temperature=0, adapter=adapters[i % len(adapters)])
            began = time.perf_counter()
            async for _ in engine.generate(request):
                pass
            times.append(time.perf_counter() - began)
        return times

    try:
        await timed(refs)  # warm-up
        return switch_cost_ms(await timed(refs[:1]), await timed(refs))
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--parallel", default="1,4,8", help="llamacpp_parallel values to measure")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp)
        keys = init_demo(demo_dir)
        print(
            f"llama.cpp engine alone, adapter switch: {asyncio.run(engine_switch_cost(demo_dir))}", flush=True
        )
        runs = [("llamacpp", int(p)) for p in args.parallel.split(",")]
        runs += [] if args.skip_vllm else [("vllm", 0)]
        for engine, parallel in runs:
            results = serve_and_measure(demo_dir, keys, engine, parallel or 4, args)
            print(f"\n== {engine}" + (f" (llamacpp_parallel={parallel})" if parallel else ""), flush=True)
            print(f"start (spawn to /readyz 200): {results.pop('start_s'):.1f} s")
            print(f"adapter switch over HTTP: {results.pop('switch')}")
            for name, row in results.items():
                print(
                    f"{name:>20}: {row['tokens_per_s']:8.1f} tokens/s  {row['req_per_s']:6.1f} req/s  "
                    f"TTFT p50 {row['ttft_p50_ms']:6.1f} ms  latency p50 {row['latency_p50_ms']:7.1f} ms  "
                    f"p95 {row['latency_p95_ms']:7.1f} ms",
                    flush=True,
                )


if __name__ == "__main__":
    main()
