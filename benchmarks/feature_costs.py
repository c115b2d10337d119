"""What each feature on the request path costs, as tokens/s and latency ratios in one run.

Telemetry, the ledger's commit mode (and its spool), fair vs FIFO scheduling, structured outputs.

    python -m benchmarks feature-costs [--rounds 6] [--seconds 30] [--clients 4] [--max-tokens 64]
        [--engine llamacpp|vllm]

One daemon per setting, all started first and kept running: the defaults (fair, telemetry on,
usage_commit "commit"), `telemetry = false`, usage_commit "async", usage_commit "fsync", scheduler
"fifo". Then phases in rounds, forwards then backwards (A B C ... C B A ...), so that a machine
getting busier or quieter weighs on every phase alike; each phase's ratio to the defaults is taken
within its round, the median over rounds reported. Besides the settings, three phases run on the
defaults daemon: the ledger's spool (this process holds the database's write lock, as an operator's
`sqlite3` session would, so every row goes to the spool) and chat completions plain against the same
with a JSON schema (structured outputs; their ratio is to plain chat). Every request is streamed and
runs to `--max-tokens` (ignore_eos), cycling over the demo's three tenants. The default engine,
llama.cpp on the demo model, makes thousands of tokens per second on two cores: lorabox's own work
per token weighs more there than behind any GPU, so the ratios are upper bounds on a feature's cost.

And what a feature costs one request in this process: a `TrafficStats.record` (telemetry), one
ledger row's write awaited (SQLite vs spool, "commit" vs "fsync"), a 50-property schema's first
request (compiled) against the second (cached) and a plain one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from appliance.telemetry.stats import TrafficStats
from appliance.tenancy.ledger import RequestRecord, UsageLedger
from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer
from benchmarks.suite import box, loadgen
from benchmarks.suite.fleet import Fleet, schedule
from benchmarks.suite.results import Results
from benchmarks.suite.stats import ratio

SETTINGS: dict[str, dict[str, object]] = {
    "defaults": {},
    "telemetry off": {"telemetry": "false"},
    "ledger async": {"usage_commit": "async"},
    "ledger fsync": {"usage_commit": "fsync"},
    "fifo": {"scheduler": "fifo"},
}
ON_DEFAULTS = ("ledger spool (db locked)", "chat plain", "chat json_schema")
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
CHAT_PROMPTS = [
    f"Order {n} {thing}, please." for n in ("one", "two", "three") for thing in ("lamps", "chairs")
]


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def chats(keys: dict[str, str], max_tokens: int, structured: bool) -> Iterator[loadgen.Request]:
    """Streamed chat completions cycling over the tenants, each running to `max_tokens` (a structured
    one is still inside its JSON there: the schema holds more), with the schema or without."""
    names, prompts = itertools.cycle(sorted(keys)), itertools.cycle(CHAT_PROMPTS)
    while True:
        model = next(names)
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": "user", "content": next(prompts)}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if structured:
            body["response_format"] = json_schema(SCHEMA)
        yield loadgen.Request(keys[model], body, path="/v1/chat/completions", label=model)


@contextlib.contextmanager
def write_lock(database: Path) -> Iterator[None]:
    """Another connection holding the database's write lock until the block ends."""
    db = sqlite3.connect(database, timeout=30, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


def server_of(name: str) -> str:
    """The daemon a phase runs on: its own setting's, or the defaults'."""
    return name if name in SETTINGS else "defaults"


def phase(
    name: str, fleet: Fleet, keys: dict[str, str], seconds: float, args: argparse.Namespace
) -> dict[str, Any]:
    server = fleet.use(server_of(name))
    if name.startswith("chat"):
        requests = chats(keys, args.max_tokens, structured=name.endswith("json_schema"))
    else:
        requests = loadgen.completions(keys, args.max_tokens)
    database = server.log_path.parent / "state" / "lorabox.db"
    with write_lock(database) if name.startswith("ledger spool") else contextlib.nullcontext():
        run = loadgen.run(lambda: loadgen.closed_loop(server.url, requests, args.clients, seconds))
    if run.errors():
        raise RuntimeError(f"{name}: {run.errors()[:3]}")
    return run.summary()


def record_cost_us(records: int = 200_000) -> float:
    """One request's TrafficStats.record, over 50 tenants."""
    stats = TrafficStats()
    batch = [
        RequestRecord(f"tenant{i % 50}", "k", "m", "v1", "chat", "vllm", 200, "stop", 12, 30, 40.0, 400.0)
        for i in range(records)
    ]
    began = time.perf_counter()
    for record in batch:
        stats.record(record)
    return (time.perf_counter() - began) / records * 1e6


def row_write_us(directory: Path, commit: str, locked: bool, rows: int = 300) -> float:
    """µs per ledger row, each awaited before the next (what a response waits for)."""
    database = directory / f"{commit}-{locked}.db"
    Store.connect(database).db.close()
    record = RequestRecord(
        "acme", "k", "acme", "v1", "completions", "llamacpp", 200, "length", 12, 64, 5.0, 90.0
    )

    async def book() -> float:
        ledger = UsageLedger(database, directory / f"spool-{commit}-{locked}", commit=commit)
        began = time.perf_counter()
        for _ in range(rows):
            await ledger.book(record)
        took = time.perf_counter() - began
        if bool(ledger.spool.rows) != locked:
            raise RuntimeError("the rows did not go where the lock says")
        return took

    with write_lock(database) if locked else contextlib.nullcontext():
        return asyncio.run(book()) / rows * 1e6


async def compile_ms(url: str, key: str) -> dict[str, float]:
    """A 1-token chat request plain, with a 50-property schema no one sent before, and with it again."""
    kinds = [
        {"type": "string", "maxLength": 12},
        {"type": "integer", "minimum": 0, "maximum": 999},
        {"type": "boolean"},
    ]
    schema = {
        "title": uuid.uuid4().hex,
        "type": "object",
        "properties": {f"field_{i}": kinds[i % 3] for i in range(50)},
        "required": [f"field_{i}" for i in range(50)],
        "additionalProperties": False,
    }
    base = {
        "model": "acme",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "temperature": 0,
    }
    took = {}
    async with aiohttp.ClientSession() as http:
        for name, body in [
            ("plain", base),
            ("schema, first (compiled)", base | {"response_format": json_schema(schema)}),
            ("schema, second (cached)", base | {"response_format": json_schema(schema)}),
        ]:
            request = loadgen.Request(key, body, "/v1/chat/completions", label=name)
            took[name] = await loadgen.timed(url, request, http) * 1000
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=30, help="per phase, over all rounds")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engine", default="llamacpp", choices=("llamacpp", "vllm"))
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="one daemon up at a time (a GPU holds one real model's engine)",
    )
    box.add_arguments(parser)
    args = parser.parse_args()
    results = Results("feature-costs", vars(args))
    phases = [*SETTINGS, *ON_DEFAULTS]
    with tempfile.TemporaryDirectory(prefix="lorabox-features-") as tmp:
        demo_dir = Path(tmp)
        keyring = {name: box.build(demo_dir / name.replace(" ", "-"), args) for name in SETTINGS}

        def start(name: str) -> LocalServer:
            folder = demo_dir / name.replace(" ", "-")
            return LocalServer.start(
                folder / "lorabox.toml",
                folder / "server.log",
                env={"LORABOX_ENGINE": args.engine},
                settings=SETTINGS[name],
            )

        fleet = Fleet(start, one_at_a_time=args.one_at_a_time)
        rounds: list[dict[str, dict[str, Any]]] = [{} for _ in range(args.rounds)]
        warmed: set[str] = set()
        compiled: list[dict[str, float]] = []
        try:
            for index, name in schedule(phases, args.rounds, server_of, args.one_at_a_time):
                if name not in warmed:  # adapters loaded, grammars compiled, one-off compilation
                    phase(name, fleet, keyring[server_of(name)], 2, args)
                    warmed.add(name)
                if name == "defaults" and not compiled:
                    compiled = [
                        asyncio.run(compile_ms(fleet.use(name).url, keyring[name]["acme"])) for _ in range(3)
                    ]
                rounds[index][name] = phase(
                    name, fleet, keyring[server_of(name)], args.seconds / args.rounds, args
                )
                print(f"round {index + 1} {name}: {rounds[index][name]['tok_per_s']:.0f} tok/s", flush=True)
        finally:
            fleet.close()

        rows = []
        for name in phases:
            against = "chat plain" if name == "chat json_schema" else "defaults"
            ratios = [ratio(r[name]["tok_per_s"], r[against]["tok_per_s"]) for r in rounds]
            rows.append(
                {
                    "phase": name,
                    "against": against,
                    "tok_per_s": statistics.median(r[name]["tok_per_s"] for r in rounds),
                    "tok_per_s_ratio": statistics.median(ratios),
                    "ttft_p50_ms": statistics.median(r[name]["ttft_p50_ms"] for r in rounds),
                    "itl_p50_ms": statistics.median(r[name]["itl_p50_ms"] for r in rounds),
                    "e2e_p50_ms": statistics.median(r[name]["e2e_p50_ms"] for r in rounds),
                    "e2e_p50_ratio": statistics.median(
                        ratio(r[name]["e2e_p50_ms"], r[against]["e2e_p50_ms"]) for r in rounds
                    ),
                    "ratio_each_round": " ".join(f"{x:.3f}" for x in ratios),
                }
            )
            results.figures[f"{name} tok/s ratio"] = rows[-1]["tok_per_s_ratio"]
        results.add_table(
            f"Throughput and latency per setting ({args.engine}, {args.clients} streamed clients, "
            f"{args.max_tokens} tokens, median of {args.rounds} rounds; ratio within each round)",
            rows,
        )
        results.bars(
            "ratios.png",
            {row["phase"]: row["tok_per_s_ratio"] for row in rows},
            "tokens/s vs its baseline (1.0 = free)",
            f"Feature costs ({args.engine}, {args.model.name if args.model else 'demo model'})",
        )
        scratch = demo_dir / "rows"
        scratch.mkdir()
        micro = [{"what": "TrafficStats.record (telemetry), one request", "us": record_cost_us()}]
        for commit in ("commit", "fsync"):
            micro.append(
                {
                    "what": f"ledger row, {commit}, to SQLite, awaited",
                    "us": row_write_us(scratch, commit, False),
                }
            )
            micro.append(
                {
                    "what": f"ledger row, {commit}, to the spool, awaited",
                    "us": row_write_us(scratch, commit, True),
                }
            )
        for name in compiled[0]:
            micro.append(
                {
                    "what": f"1-token chat, {name} (50-property schema)",
                    "us": statistics.median(c[name] for c in compiled) * 1000,
                }
            )
        results.add_table("One request's share, in this process (µs)", micro)
    results.notes.append(
        "Ratios under 1.0 are what a feature costs in tokens/s; the chat json_schema ratio is against "
        "plain chat on the same daemon. Every phase's ratio is taken within a round."
    )
    results.save()


if __name__ == "__main__":
    main()
