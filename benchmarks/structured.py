"""What structured outputs cost, on both engines: tokens/s with `json_schema` vs plain, and the
first-request compile time of a 50-property schema vs the cached second request.

    .venv/bin/python benchmarks/structured.py [--clients 8] [--rounds 3] [--skip-vllm]

One demo directory, one `lorabox serve` per engine, back to back on the same machine. The same
prompts go out plain and with a JSON schema, in alternating rounds of `--clients` concurrent
requests per tenant cycle, each running to max_tokens; tokens/s is completion tokens over wall
time, the median of the rounds. The compile time is a 1-token request's latency with a schema no
one has sent before (the server compiles it, then the engine), then the same request again (both
caches warm), beside a plain 1-token request (the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer

PROMPTS = [
    f"Order {n} {thing}, please." for n in ("one", "two", "three", "four") for thing in ("lamps", "chairs")
]
SCHEMA = {
    "type": "object",
    "properties": {
        "item": {"type": "string", "maxLength": 24},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 16},
    },
    "required": ["item", "quantity", "notes"],
    "additionalProperties": False,
}
# Every request runs to max_tokens (ignore_eos), the structured ones still inside their JSON there
# (the schema holds more): the same tokens either way, each structured one under the grammar's mask.
MAX_TOKENS = 64


def fifty_properties() -> dict[str, Any]:
    """A schema of 50 properties nobody has sent before (its title is new each time)."""
    kinds = [
        {"type": "string", "maxLength": 12},
        {"type": "integer", "minimum": 0, "maximum": 999},
        {"type": "boolean"},
    ]
    return {
        "title": uuid.uuid4().hex,
        "type": "object",
        "properties": {f"field_{i}": kinds[i % 3] for i in range(50)},
        "required": [f"field_{i}" for i in range(50)],
        "additionalProperties": False,
    }


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


async def chat(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
        return answer


async def tokens_per_s(url: str, keys: dict[str, str], clients: int, structured: bool) -> float:
    tenants = sorted(keys)
    bodies = [
        {
            "model": tenants[i % len(tenants)],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        | ({"response_format": json_schema(SCHEMA)} if structured else {})
        for i in range(clients * 2)
    ]
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        answers = await asyncio.gather(*(chat(session, url, keys[b["model"]], b) for b in bodies))
        elapsed = time.perf_counter() - began
    return sum(a["usage"]["completion_tokens"] for a in answers) / elapsed


async def compile_latencies(url: str, key: str) -> dict[str, float]:
    schema = fifty_properties()
    base = {
        "model": "acme",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    latencies = {}
    async with aiohttp.ClientSession() as session:
        for name, body in [
            ("plain", base),
            ("first (compiled)", base | {"response_format": json_schema(schema)}),
            ("second (cached)", base | {"response_format": json_schema(schema)}),
        ]:
            began = time.perf_counter()
            await chat(session, url, key, body)
            latencies[name] = (time.perf_counter() - began) * 1000
    return latencies


def measure(demo_dir: Path, keys: dict[str, str], engine: str, args: argparse.Namespace) -> None:
    server = LocalServer.start(
        demo_dir / "lorabox.toml", demo_dir / f"server-{engine}.log", env={"LORABOX_ENGINE": engine}
    )
    try:
        asyncio.run(tokens_per_s(server.url, keys, 2, False))  # warm-up: adapters, caches
        asyncio.run(tokens_per_s(server.url, keys, 2, True))
        plain, structured = [], []
        for _ in range(args.rounds):
            plain.append(asyncio.run(tokens_per_s(server.url, keys, args.clients, False)))
            structured.append(asyncio.run(tokens_per_s(server.url, keys, args.clients, True)))
        p, s = statistics.median(plain), statistics.median(structured)
        print(f"\n== {engine}", flush=True)
        cost = (s - p) / p
        print(
            f"tokens/s, {args.clients * 2} requests at once: plain {p:.1f}, json_schema {s:.1f} ({cost:+.1%})"
        )
        runs = [asyncio.run(compile_latencies(server.url, keys["acme"])) for _ in range(args.rounds)]
        for name in runs[0]:
            median = statistics.median(r[name] for r in runs)
            print(f"50-property schema, 1-token request, {name}: {median:.1f} ms")
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp)
        keys = init_demo(demo_dir)
        for engine in ["llamacpp"] + ([] if args.skip_vllm else ["vllm"]):
            measure(demo_dir, keys, engine, args)


if __name__ == "__main__":
    main()
