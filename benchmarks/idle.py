"""Idle CPU of the box, per process, and tokens/s under load, for variants of the engine's
environment side by side.

    .venv/bin/python benchmarks/idle.py [--engine vllm] [--clients 4] [--seconds 20] [--rounds 3]
        [--idle-seconds 30] [--variant NAME=VAR=VALUE,VAR=VALUE ...]

One demo directory per variant (the same deterministic demo); one `lorabox serve` each, all
started before anything is measured (a variant given no variables is the box as it ships).
Throughput is measured in rounds, each variant once per round in turn and in the reverse order
every other round, so that the load from other work on a shared machine falls on every variant
alike; the median over rounds is printed, with each round's ratio to the first variant. Then,
with every server idle, the CPU each of a box's processes used over `--idle-seconds` (% of one
core: user + system time of all its threads, the same window for every variant), and the threads
that used the most.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import psutil
from concurrency import run  # type: ignore[import-not-found]  # the sibling benchmark

from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer

SETTLE_S = 5.0


def cpu_seconds(server: LocalServer) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, thread id) → (the process's name, CPU seconds so far), for the box's every thread."""
    root = psutil.Process(server.process.pid)
    seen = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            name = process.name()
            for thread in process.threads():
                seen[(process.pid, thread.id)] = (name, thread.user_time + thread.system_time)
        except psutil.Error:
            continue
    return seen


def thread_name(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


def idle_report(servers: dict[str, LocalServer], seconds: float) -> None:
    before = {name: cpu_seconds(server) for name, server in servers.items()}
    began = time.monotonic()
    time.sleep(seconds)
    after = {name: cpu_seconds(server) for name, server in servers.items()}
    wall = time.monotonic() - began
    for name in servers:
        used = {key: cpu - before[name].get(key, ("", 0.0))[1] for key, (_, cpu) in after[name].items()}
        per_process: dict[tuple[int, str], float] = {}
        for (pid, tid), spent in used.items():
            key = (pid, after[name][(pid, tid)][0])
            per_process[key] = per_process.get(key, 0.0) + spent
        total = sum(used.values())
        print(f"  {name}: {100 * total / wall:.2f}% of a core in all")
        for (_pid, process), spent in sorted(per_process.items(), key=lambda item: -item[1]):
            if spent > 0:
                print(f"    {process:<18} {100 * spent / wall:6.2f}%")
        busiest = sorted(used.items(), key=lambda item: -item[1])[:3]
        shares = (f"{thread_name(*key)} {100 * spent / wall:.2f}%" for key, spent in busiest)
        print("    busiest threads: " + ", ".join(shares))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", default="vllm", choices=["vllm", "llamacpp"])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=VAR=VALUE,VAR=VALUE: an environment for the server (repeatable); NAME= alone: as shipped",
    )
    args = parser.parse_args()
    variants: dict[str, dict[str, str]] = {}
    for spec in args.variant or ["as-shipped="]:
        name, _, assignments = spec.partition("=")
        variants[name] = dict(a.split("=", 1) for a in assignments.split(",") if a)

    with tempfile.TemporaryDirectory(prefix="lorabox-idle-") as tmp:
        servers, keys = {}, {}
        try:
            for name, env in variants.items():
                demo_dir = Path(tmp) / name
                keys[name] = init_demo(demo_dir)
                servers[name] = LocalServer.start(
                    demo_dir / "lorabox.toml",
                    demo_dir / "server.log",
                    env={"LORABOX_ENGINE": args.engine, **env},
                )
                print(f"{name}: ready in {servers[name].start_seconds:.1f} s  {env}", flush=True)
            tokens: dict[str, list[float]] = {name: [] for name in variants}
            for round_ in range(args.rounds):
                order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
                for name in order:
                    result = asyncio.run(
                        run(servers[name].url, keys[name], args.clients, args.seconds, args.max_tokens)
                    )
                    tokens[name].append(result["tokens_per_s"])
                first = next(iter(variants))
                print(
                    f"round {round_ + 1}: "
                    + "  ".join(
                        f"{name} {tokens[name][-1]:.0f} tok/s ({tokens[name][-1] / tokens[first][-1]:.2f})"
                        for name in variants
                    ),
                    flush=True,
                )
            print(f"tokens/s, {args.clients} clients, median of {args.rounds} rounds:")
            for name in variants:
                print(f"  {name}: {statistics.median(tokens[name]):.0f}")
            # After its last request vLLM's worker polls its queue for a second (shm_broadcast's
            # SpinCondition): measured from the end of the last round, that second lands on the
            # variant that ran last.
            time.sleep(SETTLE_S)
            print(f"idle, {args.idle_seconds:g} s, every server idle:")
            idle_report(servers, args.idle_seconds)
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
