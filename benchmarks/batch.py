"""Batch jobs: a batch's tokens/s on an otherwise idle box vs the same requests sent as plain
concurrent requests, and interactive TTFT p50/p95 with and without a batch running.

    python -m benchmarks batch [--demo DIR] [--lines 200] [--rounds 4] [--samples 10] [--engine llamacpp]
        [--batch-max-running N]

One daemon (a demo directory: `--demo`, or one built in a temporary directory). Throughput: the
same `--lines` chat requests of acme, as a batch (create -> completed, its output's completion
tokens over the wall time), as plain requests from as many concurrent clients as the band has
places (what the batch machinery costs), and from as many as the engine has places (what the
band's cap costs, by design), in rotating order over `--rounds` rounds; median ratios. Latency:
globex sends `--samples` streamed requests one at a time, alternately with no batch running and
while a batch of acme runs. Results: benchmarks/results/batch/.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from openai import AsyncOpenAI

from appliance.api.adminclient import AdminClient
from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer
from benchmarks.suite.results import Results
from benchmarks.suite.stats import percentile

MAX_TOKENS = 24


def body(i: int, tenant: str = "acme") -> dict[str, object]:
    content = f"Summarise support ticket {i}: the customer's order arrived late and damaged."
    return {"model": tenant, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0}  # fmt: skip


async def run_batch(client: AsyncOpenAI, lines: int, offset: int) -> tuple[float, int]:
    """(seconds from create to completed, completion tokens) of a batch of `lines` requests."""
    url = "/v1/chat/completions"
    data = b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body(offset + i)}).encode()
        + b"\n"
        for i in range(lines)
    )
    uploaded = await client.files.create(file=("b.jsonl", io.BytesIO(data)), purpose="batch")
    began = time.perf_counter()
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    took = time.perf_counter() - began
    assert batch.status == "completed", batch
    assert batch.output_file_id is not None
    output = (await client.files.content(batch.output_file_id)).content.splitlines()
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in output)
    return took, tokens


async def run_plain(client: AsyncOpenAI, lines: int, clients: int, offset: int) -> tuple[float, int]:
    queue = list(range(lines))
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            response = await client.chat.completions.create(**body(offset + i))  # type: ignore[call-overload]
            tokens += response.usage.completion_tokens

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - began, tokens


async def ttft(client: AsyncOpenAI, i: int) -> float:
    began = time.perf_counter()
    stream = await client.chat.completions.create(**body(i, "globex"), stream=True)  # type: ignore[call-overload]
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
    return (first if first is not None else time.perf_counter() - began) * 1000


async def measure(
    server: LocalServer, keys: dict[str, str], args: argparse.Namespace, places: int, band: int
) -> Results:
    results = Results(
        "batch", {k: v for k, v in vars(args).items() if k != "demo"} | {"places": places, "band": band}
    )
    acme = AsyncOpenAI(base_url=server.base_url, api_key=keys["acme"], max_retries=0)
    globex = AsyncOpenAI(base_url=server.base_url, api_key=keys["globex"], max_retries=0)
    kinds = {"batch": 0, f"plain x{band}": band, f"plain x{places}": places}
    rows = []
    for round_ in range(args.rounds):
        order = list(kinds)[round_ % 3 :] + list(kinds)[: round_ % 3]  # each kind first in turn
        row: dict[str, object] = {"round": round_}
        for kind in order:
            offset = 10_000 * (round_ * 3 + order.index(kind))
            clients = kinds[kind]
            took, tokens = (
                await run_plain(acme, args.lines, clients, offset)
                if clients
                else await run_batch(acme, args.lines, offset)
            )
            row[f"{kind} tok/s"] = tokens / took
        rows.append(row)
        print(row, flush=True)
    results.add_table("Throughput, idle box (completion tokens/s)", rows)
    for kind in list(kinds)[1:]:
        ratio = statistics.median(float(r["batch tok/s"]) / float(r[f"{kind} tok/s"]) for r in rows)  # type: ignore[arg-type]
        results.figures[f"batch / {kind} (median)"] = round(ratio, 3)

    alone: list[float] = []
    beside: list[float] = []
    for sample in range(args.samples):
        alone.append(await ttft(globex, sample))
        batch = asyncio.create_task(run_batch(acme, args.lines, 900_000 + 1000 * sample))
        await asyncio.sleep(0.5)  # the batch validated and its lines running
        beside.append(await ttft(globex, sample))
        await batch
    results.add_table(
        "globex's time to first token (ms)",
        [
            {
                "with": name,
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "samples": len(values),
            }
            for name, values in (("no batch", alone), ("a batch running", beside))
        ],
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, help="a demo directory (default: one built now)")
    parser.add_argument("--engine", default="llamacpp")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument(
        "--batch-max-running",
        type=int,
        default=0,
        help="the band's places (0: the default, half the engine's)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        demo = args.demo or Path(scratch) / "demo"
        keys = json.loads((demo / "keys.json").read_text()) if args.demo else init_demo(demo)
        server = LocalServer.start(
            demo / "lorabox.toml",
            Path(scratch) / "server.log",
            env={"LORABOX_ENGINE": args.engine},
            settings={"batch_max_running": args.batch_max_running},
        )
        try:
            admin = AdminClient(demo / "state" / "admin.sock")
            places = int(admin.call("GET", "/admin/tenants/acme/policy")["box"]["max_running"])
            band = int(admin.call("GET", "/admin/status")["batches"]["band"]["places"])
            print(f"engine {admin.call('GET', '/admin/status')['engine']}, {places} places, band {band}")
            results = asyncio.run(measure(server, keys, args, places, band))
            results.save()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
