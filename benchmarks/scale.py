"""Many adapters: 5 vs 200 vs 1000 registered, cold loads, residency hit rates under a Zipf load.

Throughput, start time and memory with 5, 200 and 1000 registered (the same 5 hot), cold-load time,
and residency hit rates with more tenants than GPU slots under a Zipf load.

    python -m benchmarks scale [--counts 5,200,1000] [--rounds 8] [--seconds 40] [--clients 8]
        [--engine vllm|llamacpp] [--cold 20] [--requests 20000]

1. One daemon per count, each started alone (its start time, `lorabox serve` to /readyz, is not
   shared with another start), all kept up, only the one measured running (benchmarks/suite/
   servers.py); throughput of the same 5 hot tenants (the demo's three and two more, streamed,
   closed loop) in rounds A B C, C B A, ..., so that a machine getting busier or quieter weighs on
   every count alike; each count's ratio to 5 is taken within a round and the median over rounds
   reported. `--one-at-a-time`: each daemon in one stretch, alone (a GPU holds one real model).
   Memory: the resident set of the daemon's whole process group (the engine core included) after
   its rounds. The registered-but-idle adapters are copies of one adapter.
2. Cold load: the box with the most adapters started again with 4 GPU slots and 8 places in host
   memory (a daemon warms every adapter at start; with these caches all but the last few are on disk
   only), then a 1-token request to a tenant whose adapter was never used (the engine reads it from
   disk into a slot) against the same request right after (a slot hit); the difference, p50/p95
   over `--cold` tenants.
3. Residency: lorabox's model of the engine's two LRU caches (appliance/adapters/residency.py, the
   same rules as vLLM's) replaying a Zipf(1.0) request stream over N active tenants with S GPU slots:
   the share of requests whose adapter held a slot (no load at all) and of those found in host memory
   (no disk read); the slot counts include what the planner gives 200 adapters on a 24 GB card.
   Plus the slots the residency planner gives an 8B model (Llama 3 shapes, rank 16,
   bf16) on a 24 GB and a 48 GB card, the cards docs/benchmarks.md is about.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.adapters.drops import BaseModelInfo
from appliance.adapters.residency import ResidencyTracker, lora_budget_bytes, plan
from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer
from benchmarks.suite import box, loadgen
from benchmarks.suite.fleet import Fleet, schedule
from benchmarks.suite.results import Results
from benchmarks.suite.stats import percentile

HOT_EXTRA = ("hot3", "hot4")  # with the demo's acme, globex, initech: the 5 hot tenants


def build_box(folder: Path, count: int, args: argparse.Namespace) -> dict[str, str]:
    """A demo box with `count` tenants, each with an adapter; returns the 5 hot tenants' keys."""
    keys = box.build(folder, args)
    keys |= box.add_tenants(folder, list(HOT_EXTRA), 700, box.model_dir(folder, args))
    adapters = folder / "adapters"
    with Store.open(folder / "state" / "lorabox.db") as store:
        template = adapters / HOT_EXTRA[0] / "v1"
        for i in range(count - len(keys)):
            name = f"idle{i:04d}"
            shutil.copytree(template, adapters / name / "v1")
            store.add_tenant(name)
    return keys


def issue_keys(folder: Path, names: list[str]) -> dict[str, str]:
    with Store.open(folder / "state" / "lorabox.db") as store:
        return {name: store.issue_key(name).plaintext for name in names}


def group_rss_mib(server: LocalServer) -> float:
    """Resident memory of every process in the daemon's process group (the engine core's too)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != server.process.pid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


def throughput(server: LocalServer, keys: dict[str, str], clients: int, seconds: float) -> float:
    run = loadgen.run(
        lambda: loadgen.closed_loop(server.url, loadgen.completions(keys, 32), clients, seconds)
    )
    if run.errors():
        raise RuntimeError(f"failed requests: {run.errors()[:3]}")
    return float(run.summary()["tok_per_s"])


async def one_token(url: str, key: str, model: str) -> float:
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    return await loadgen.timed(url, loadgen.Request(key, body, label=model))


def cold_loads(server: LocalServer, keys: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for name, key in keys.items():
        cold = asyncio.run(one_token(server.url, key, name))
        warm = asyncio.run(one_token(server.url, key, name))
        rows.append(
            {"tenant": name, "cold_ms": cold * 1000, "warm_ms": warm * 1000, "load_ms": (cold - warm) * 1000}
        )
    return rows


def zipf_hits(tenants: int, slots: int, host: int, requests: int, seed: int = 0) -> tuple[float, float]:
    """(share of requests whose adapter held a GPU slot, share found in host memory or a slot) when
    `requests` requests over `tenants` tenants with Zipf(1.0) popularity go through the tracker. The
    first request of each tenant is a miss whatever the sizes: counted, as a real day has them."""
    draw = random.Random(seed)  # noqa: S311 (a workload, not a secret)
    names = [f"t{i}" for i in range(tenants)]
    weights = [1 / (rank + 1) for rank in range(tenants)]
    tracker = ResidencyTracker(min(slots, host), host)
    in_slot = in_host = 0
    for name in draw.choices(names, weights, k=requests):
        tier = tracker.report([name])[0].tier
        in_slot += tier == "gpu"
        in_host += tier in ("gpu", "cpu")
        tracker.used(name, 0.0)
    return in_slot / requests, in_host / requests


def llama3_8b() -> BaseModelInfo:
    """Llama 3 8B's linear layers (32 layers; hidden 4096, 8 KV heads of 128, MLP 14336)."""
    shapes = {}
    for layer in range(32):
        prefix = f"model.layers.{layer}"
        for module, shape in {
            "self_attn.q_proj": (4096, 4096),
            "self_attn.k_proj": (1024, 4096),
            "self_attn.v_proj": (1024, 4096),
            "self_attn.o_proj": (4096, 4096),
            "mlp.gate_proj": (14336, 4096),
            "mlp.up_proj": (14336, 4096),
            "mlp.down_proj": (4096, 14336),
        }.items():
            shapes[f"{prefix}.{module}"] = shape
    shapes["lm_head"] = (128256, 4096)
    return BaseModelInfo(shapes)


def planned_slots(card_gib: int, adapters: int) -> tuple[int, str]:
    """The planner's slots for Llama 3 8B in bf16 (16.1 GB of weights) at lorabox's defaults."""
    usable = int(card_gib * 2**30 * 0.90) - 16_060_000_000
    sizes = plan(
        adapters=adapters,
        pinned=0,
        base=llama3_8b(),
        max_rank=16,
        dtype_bytes=2,
        lora_budget_bytes=lora_budget_bytes(gpu_free_bytes=usable, cpu_budget_bytes=0),
        configured_max_loras=None,
        configured_max_cpu_loras=None,
    )
    return sizes.max_loras, sizes.reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="5,200,1000")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=40, help="per count, over all rounds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "llamacpp"))
    parser.add_argument("--cold", type=int, default=20, help="never-used tenants to time a cold load on")
    parser.add_argument("--requests", type=int, default=20_000, help="per residency replay")
    parser.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="one daemon up at a time (a GPU holds one real model's engine)",
    )
    box.add_arguments(parser)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results = Results("scale", vars(args))
    window = args.seconds / args.rounds

    with tempfile.TemporaryDirectory(prefix="lorabox-scale-") as tmp:
        keys: dict[str, dict[str, str]] = {}
        for count in counts:
            began = time.monotonic()
            keys[str(count)] = build_box(Path(tmp) / str(count), count, args)
            print(f"{count} adapters built in {time.monotonic() - began:.0f} s", flush=True)

        def start(name: str) -> LocalServer:
            folder = Path(tmp) / name
            return LocalServer.start(
                folder / "lorabox.toml",
                folder / "server.log",
                env={"LORABOX_ENGINE": args.engine},
            )

        fleet = Fleet(start, one_at_a_time=args.one_at_a_time)
        cold: LocalServer | None = None
        try:
            rounds: list[dict[str, float]] = [{} for _ in range(args.rounds)]
            rss: dict[str, float] = {}
            for index, name in schedule([str(c) for c in counts], args.rounds, str, args.one_at_a_time):
                if name not in rss:  # every batch size once: one-off kernel compilation out of the rounds
                    for clients in sorted({1, 2, args.clients}):
                        throughput(fleet.use(name), keys[name], clients, 2)
                rounds[index][name] = throughput(fleet.use(name), keys[name], args.clients, window)
                rss[name] = group_rss_mib(fleet.use(name))
                print(f"round {index + 1}, {name} adapters: {rounds[index][name]:.0f} tok/s", flush=True)
            rows: list[dict[str, Any]] = []
            first = str(counts[0])
            for count in counts:
                ratios = [r[str(count)] / r[first] for r in rounds]
                rows.append(
                    {
                        "registered": count,
                        "start_s": fleet.start_seconds[str(count)],
                        "rss_mib": rss[str(count)],
                        "tok_per_s_median": statistics.median(r[str(count)] for r in rounds),
                        f"ratio_vs_{first}": statistics.median(ratios),
                        "ratio_each_round": " ".join(f"{x:.3f}" for x in ratios),
                    }
                )
            results.add_table(
                f"Throughput of the same 5 hot tenants ({args.clients} clients, 32 tokens, {args.engine})",
                rows,
            )
            results.figures[f"throughput_{counts[-1]}_vs_{counts[0]}"] = rows[-1][f"ratio_vs_{counts[0]}"]
            results.plot(
                "throughput.png",
                {"tokens/s (median of rounds)": [(r["registered"], r["tok_per_s_median"]) for r in rows]},
                "adapters registered",
                "tokens/s",
                "Same 5 hot tenants, more adapters registered",
                logx=True,
            )

            largest = counts[-1]
            fleet.close()
            # Cold loads need adapters out of host memory: the largest box again with 4 GPU slots and
            # 8 places in host memory, so that all but the last few warmed at start are on disk only.
            folder = Path(tmp) / str(largest)
            idle = [f"idle{i:04d}" for i in range(min(args.cold, largest - 20))]
            cold_keys = issue_keys(folder, idle)
            cold = LocalServer.start(
                folder / "lorabox.toml",
                folder / "server-small-caches.log",
                env={"LORABOX_ENGINE": args.engine},
                settings={"max_loras": 4, "max_cpu_loras": 8},
            )
            loads = cold_loads(cold, cold_keys)
            load_ms = [row["load_ms"] for row in loads]
            results.figures["cold_load_p50_ms"] = percentile(load_ms, 50)
            results.figures["cold_load_p95_ms"] = percentile(load_ms, 95)
            results.add_table(
                f"Cold load from disk ({largest} registered; 4 GPU slots, 8 in host memory): "
                "1-token request to a never-used adapter, then again",
                [
                    {
                        "tenants": len(loads),
                        "cold_p50_ms": percentile([r["cold_ms"] for r in loads], 50),
                        "warm_p50_ms": percentile([r["warm_ms"] for r in loads], 50),
                        "load_p50_ms": percentile(load_ms, 50),
                        "load_p95_ms": percentile(load_ms, 95),
                        "load_max_ms": max(load_ms),
                    }
                ],
            )
        finally:
            fleet.close()
            if cold is not None:
                cold.stop()

    cards: list[dict[str, Any]] = []
    for gib in (24, 48):
        for adapters in (20, 200):
            slots, reason = planned_slots(gib, adapters)
            cards.append({"card_gib": gib, "adapters": adapters, "slots": slots, "plan": reason})
    results.add_table(
        "Residency planner: GPU slots for Llama 3 8B, bf16, rank 16, at lorabox's defaults", cards
    )

    replay = []
    curves: dict[str, list[tuple[float, float]]] = {}
    planned = {row["adapters"]: row["slots"] for row in cards if row["card_gib"] == 24}
    for tenants in (20, 50, 200):
        for slots in sorted({4, 8, 16, 32, planned[200]}):
            gpu, host = zipf_hits(tenants, slots, tenants + 16, args.requests)
            replay.append(
                {"active_tenants": tenants, "gpu_slots": slots, "slot_hit": gpu, "no_disk_read": host}
            )
            curves.setdefault(f"{tenants} active tenants", []).append((slots, gpu))
    results.add_table(
        f"Residency replay: Zipf(1.0) over the active tenants, {args.requests} requests, "
        "host cache = tenants + 16",
        replay,
    )
    at20 = [row for row in replay if row["active_tenants"] == 20]
    results.figures["slot_hit_rate_20_tenants_8_slots"] = next(
        r["slot_hit"] for r in at20 if r["gpu_slots"] == 8
    )
    results.figures["slot_hit_rate_20_tenants_16_slots"] = next(
        r["slot_hit"] for r in at20 if r["gpu_slots"] == 16
    )
    results.figures[f"slot_hit_rate_20_tenants_{planned[200]}_slots_planned_for_200_on_24gb"] = next(
        r["slot_hit"] for r in at20 if r["gpu_slots"] == planned[200]
    )
    results.plot(
        "residency.png",
        curves,
        "GPU slots",
        "share of requests finding a slot",
        "Zipf(1.0) residency hit rate",
    )
    results.notes.append(
        "Idle adapters are copies of one adapter (what is measured is registration, not weights). "
        "The replay is lorabox's model of vLLM's LRU caches (ResidencyTracker), not a readout of vLLM."
    )
    results.save()


if __name__ == "__main__":
    main()
