"""What the usage ledger's durability costs: tokens/s with rows going to SQLite (`usage_commit =
"commit"`) and with every row going to the spool (another program holding the database's write
lock), in the same run, against one live demo daemon; and what one row's write costs either way.

    .venv/bin/python -m benchmarks.ledger [--rounds 3] [--clients 4] [--seconds 15] [--max-tokens 64]
                                          [--engine llamacpp] [--baseline /path/to/older/checkout]

1. Tokens/s (benchmarks/concurrency.py's streaming clients, every demo tenant) in phases
   commit, spool, spool, commit, ... on the same daemon, so that a machine that gets busier or
   quieter weighs on both alike. A spool phase holds a write lock on the database from this
   process (BEGIN IMMEDIATE on a connection of its own, as an operator's `sqlite3` session would)
   and checks that the rows did go to the spool.
2. `--baseline DIR`: the same phases against a daemon run from another checkout (an older
   lorabox, whose ledger waited for the lock), for the before/after of a lock.
3. One row's write, awaited before the next (what a response waits for), in this process:
   SQLite against the spool, for "commit" and "fsync".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from appliance.demo.build import init_demo
from appliance.tenancy.ledger import RequestRecord, UsageLedger
from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer
from benchmarks.concurrency import run


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


def spooled_rows(server: LocalServer) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:  # noqa: S310 (loopback)
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("lorabox_usage_spooled_rows "))


def phases(
    demo_dir: Path, keys: dict[str, str], args: argparse.Namespace, code: str | None
) -> dict[str, list[dict[str, float]]]:
    # PYTHONSAFEPATH: `python -m appliance` must not import this checkout from the working folder.
    env = {"LORABOX_ENGINE": args.engine} | ({"PYTHONPATH": code, "PYTHONSAFEPATH": "1"} if code else {})
    server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server.log", env=env)
    database = demo_dir / "state" / "lorabox.db"
    measured: dict[str, list[dict[str, float]]] = {"commit": [], "spool": []}
    try:
        asyncio.run(run(server.url, keys, args.clients, 3, 32))  # warm-up
        order = [("commit", "spool")[(i + i // 2) % 2] for i in range(2 * args.rounds)]  # c s s c c s
        for phase in order:
            with write_lock(database) if phase == "spool" else contextlib.nullcontext():
                result = asyncio.run(run(server.url, keys, args.clients, args.seconds, args.max_tokens))
                if phase == "spool" and code is None:
                    assert spooled_rows(server) > 0, "the lock sent no row to the spool"
            measured[phase].append(result)
            print(
                f"  {phase:<6} {result['tokens_per_s']:8.0f} tok/s  p50 {result['latency_p50_ms']:6.0f} ms",
                flush=True,
            )
    finally:
        server.stop()
    return measured


def report(title: str, measured: dict[str, list[dict[str, float]]]) -> None:
    print(f"\n{title}")
    for phase, results in measured.items():
        tokens = [r["tokens_per_s"] for r in results]
        latency = [r["latency_p50_ms"] for r in results]
        each = ", ".join(f"{t:.0f}" for t in tokens)
        print(
            f"  {phase:<6} tokens/s {statistics.median(tokens):8.0f} (each: {each})"
            f"   latency p50 {statistics.median(latency):7.0f} ms"
        )
    ratio = statistics.median(r["tokens_per_s"] for r in measured["spool"]) / statistics.median(
        r["tokens_per_s"] for r in measured["commit"]
    )
    print(f"  spool / commit tokens/s: {ratio:.2f}")


def row_write_us(directory: Path, commit: str, locked: bool, rows: int = 300) -> float:
    """µs per row, each awaited before the next: one write (and, for "fsync", one fsync) a row."""
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
        assert bool(ledger.spool.rows) == locked
        return took

    with write_lock(database) if locked else contextlib.nullcontext():
        return asyncio.run(book()) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--engine", default="llamacpp", choices=("llamacpp", "vllm"))
    parser.add_argument(
        "--baseline", help="another checkout to run the same phases against (an older lorabox)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp) / "demo"
        keys = init_demo(demo_dir)
        print(f"this checkout ({args.engine}, {args.clients} clients, {args.max_tokens} tokens a request):")
        report(
            "this checkout: rows to SQLite (commit) vs to the spool (database locked)",
            phases(demo_dir, keys, args, None),
        )
        if args.baseline:
            baseline = Path(tmp) / "baseline"
            own = shutil.ignore_patterns("state", "lorabox.toml", "keys.json")  # its own state, config, keys
            shutil.copytree(demo_dir, baseline, ignore=own)
            keys = init_demo(baseline)
            print(f"\nbaseline {args.baseline}:")
            report(f"baseline {args.baseline}: the same phases", phases(baseline, keys, args, args.baseline))
        scratch = Path(tmp) / "rows"
        scratch.mkdir()
        print("\none row's write, awaited (what a response waits for):")
        for commit in ("commit", "fsync"):
            database, spool = row_write_us(scratch, commit, False), row_write_us(scratch, commit, True)
            print(f"  {commit:<6} SQLite {database:7.0f} µs   spool {spool:7.0f} µs")


if __name__ == "__main__":
    main()
