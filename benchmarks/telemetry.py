"""What telemetry costs the request path, and what the TUI costs, against live demo daemons.

    .venv/bin/python -m benchmarks.telemetry [--rounds 4] [--clients 4] [--seconds 20] [--tui-seconds 60]

1. Tokens/s with telemetry on and off (`telemetry = false`: no request is counted, vLLM's scheduler
   stats are not read), in one run: a daemon per setting and round, in the order on, off, off, on,
   ..., so that a machine that gets busier or quieter meanwhile weighs on both alike. Each is
   measured with the concurrent streaming clients of benchmarks/concurrency.py after a warm-up.
   On a shared machine run several rounds: one round's difference is mostly noise.
2. The cost of one `TrafficStats.record` (what telemetry adds to each request in lorabox's own
   code), timed in this process over 200,000 records of 50 tenants.
3. The TUI's own CPU use at 2 s refresh (`lorabox tui` on a 160x45 pty, benchmarks/tui_cpu.py)
   against a live daemon while two tenants send requests, so that its rows and sparklines move.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path

from appliance.demo.build import init_demo
from appliance.telemetry.stats import TrafficStats
from appliance.tenancy.ledger import RequestRecord
from appliance.testing.localserver import LocalServer
from benchmarks.concurrency import run
from benchmarks.tui_cpu import measure


def throughput(demo_dir: Path, keys: dict[str, str], telemetry: bool, clients: int, seconds: float) -> float:
    server = LocalServer.start(
        demo_dir / "lorabox.toml", demo_dir / f"server-{telemetry}.log", settings={"telemetry": telemetry}
    )
    try:
        asyncio.run(run(server.url, keys, clients, 3, 32))  # warm-up
        return asyncio.run(run(server.url, keys, clients, seconds, 64))["tokens_per_s"]
    finally:
        server.stop()


def record_cost_us(records: int = 200_000) -> float:
    stats = TrafficStats()
    batch = [
        RequestRecord(
            tenant=f"tenant{i % 50}",
            key_id="k",
            model="m",
            adapter_version="v1",
            endpoint="chat",
            engine="vllm",
            status=200,
            finish_reason="stop",
            prompt_tokens=12,
            completion_tokens=30,
            ttft_ms=40.0,
            latency_ms=400.0,
        )
        for i in range(records)
    ]
    began = time.perf_counter()
    for record in batch:
        stats.record(record)
    return (time.perf_counter() - began) / records * 1e6


def tui_cpu(demo_dir: Path, keys: dict[str, str], seconds: float) -> tuple[float, int]:
    """(% of one core, requests sent meanwhile) for the TUI at 2 s against a busy live daemon."""
    server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server-tui.log")
    two = dict(sorted(keys.items())[:2])
    sent: list[float] = []
    traffic = threading.Thread(
        target=lambda: sent.append(asyncio.run(run(server.url, two, 2, seconds + 15, 32))["requests"]),
        daemon=True,
    )
    try:
        traffic.start()
        _, percent, _ = measure(demo_dir / "state" / "admin.sock", seconds, 2.0)
        traffic.join()
        return percent, int(sent[0]) if sent else 0
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--tui-seconds", type=float, default=60)
    args = parser.parse_args()
    print(f"TrafficStats.record: {record_cost_us():.2f} µs per request", flush=True)
    with tempfile.TemporaryDirectory(prefix="lorabox-bench-") as tmp:
        demo_dir = Path(tmp)
        keys = init_demo(demo_dir)
        results: dict[bool, list[float]] = {True: [], False: []}
        for round_ in range(args.rounds):
            # on, off, off, on, ...: a machine that gets busier or quieter weighs on both alike
            for telemetry in (True, False) if round_ % 2 == 0 else (False, True):
                tokens = throughput(demo_dir, keys, telemetry, args.clients, args.seconds)
                results[telemetry].append(tokens)
                print(
                    f"round {round_ + 1} telemetry {'on ' if telemetry else 'off'}: {tokens:.1f} tok/s",
                    flush=True,
                )
        on, off = statistics.mean(results[True]), statistics.mean(results[False])
        print(f"telemetry on {on:.1f} tok/s, off {off:.1f} tok/s: on/off = {on / off:.3f}", flush=True)
        if args.tui_seconds:
            percent, requests = tui_cpu(demo_dir, keys, args.tui_seconds)
            print(
                f"TUI at 2 s refresh against the live daemon: {percent:.2f}% of one core over "
                f"{args.tui_seconds:g} s ({requests} requests from two tenants meanwhile)"
            )


if __name__ == "__main__":
    main()
