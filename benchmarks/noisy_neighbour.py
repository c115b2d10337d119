"""A noisy neighbour (tenant B alone, then under tenant A's flood) and what fairness costs.

Tenant B alone, then B while tenant A floods at ten times B's concurrency, fair scheduler against
FIFO (and the ledger's commit mode, and vllm serve).

    python -m benchmarks noisy-neighbour [--b-clients 2] [--flood 10] [--seconds 20] [--max-running 4]
        [--max-tokens 64] [--runs fair,fifo,fair-async,vllm] [--engine auto|vllm|llamacpp]
        [--llamacpp-parallel 8] [--base] [--out DIR]

Builds the demo in a temporary directory and, for each run, starts `lorabox serve` with that run's
settings: `fair` (the fair scheduler, the default), `fifo` (the same queue in order of arrival:
fairness off), `fair-async` (fair, with usage_commit = "async": the ledger's cost is the difference
from `fair`), `vllm` (the same load against `vllm serve` on the same model and adapters: vLLM's own
first-come-first-served scheduler, no lorabox in front). The fairness cost is the total tokens/s
under the flood, fair / fifo: what lorabox's fair queue gives up in throughput. B is the demo
tenant acme, A is globex, each on its own adapter; each tenant's clients run in a process of their
own (appliance/testing/tenantload.py), sending streamed completions back to back. Writes to
benchmarks/results/noisy-neighbour/ (or `--out`), per run and phase: B's time to first token (a
request still waiting for one at the end counts with its wait so far) and end-to-end p50/p95, each
tenant's completion tokens/s and its share of the service (prompt + 2 x completion), the total
tokens/s, and the engine's step time at the batch size reached (batch / tokens/s: B alone runs
`b_clients` at once; under the flood lorabox holds `max_running`, vllm serve every request).
`--engine llamacpp` runs lorabox on its llama.cpp engine (where vLLM cannot run), with
`--llamacpp-parallel` sequences: room for the places taken on top of `max_running`. `--base`: both
tenants ask for the base model, so that every batch is of one model (llama.cpp decodes each
adapter's requests apart: mixing adapters costs it steps).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.demo.build import DEMO_MODEL_NAME
from appliance.testing.localserver import LocalServer
from appliance.testing.tenantload import LoadProcess, LoadResult, start_together
from benchmarks.suite import box
from benchmarks.suite.results import Results, cell
from benchmarks.suite.servers import vllm_serve
from benchmarks.suite.stats import percentile, ratio

RUNS = {
    "fair": {"scheduler": "fair"},
    "fifo": {"scheduler": "fifo"},
    "fair-async": {"scheduler": "fair", "usage_commit": "async"},
}
B, A = "acme", "globex"
WARM_UP_S = 3.0  # left out of the shares and rates: the load processes starting, the queues filling


@contextlib.contextmanager
def vllm_served(demo_dir: Path, log: Path, args: argparse.Namespace) -> Iterator[str]:
    """`vllm serve` on the box's model with B's and A's adapters, set up as lorabox's engine is for
    the box (the demo's max_model_len is the model's 1024)."""
    real = args.model is not None
    with vllm_serve(
        demo_dir,
        (B, A),
        log,
        max_loras=2,
        max_model_len=args.max_model_len if real else 1024,
        kv_cache_gib=4,
        model=box.model_dir(demo_dir, args),
        dtype=args.dtype if real else "float32",
    ) as peer:
        yield peer.url


def phase(
    url: str, keys: dict[str, str], clients: dict[str, int], seconds: float, args: argparse.Namespace
) -> dict[str, LoadResult]:
    loads = {
        tenant: LoadProcess(
            url,
            keys[tenant],
            n,
            seconds,
            model=DEMO_MODEL_NAME if args.base else tenant,
            max_tokens=args.max_tokens,
            stream=True,
        )
        for tenant, n in clients.items()
    }
    start_together(list(loads.values()))
    return {tenant: load.result(timeout_s=seconds + 300) for tenant, load in loads.items()}


def report(
    run: str, name: str, results: dict[str, LoadResult], seconds: float, batch: int
) -> list[dict[str, Any]]:
    """One phase's rows, one per tenant and one for the total. `batch`: the requests the engine holds
    at once throughout (every client sends back to back)."""
    span = seconds - WARM_UP_S
    total_cost = sum(r.cost(WARM_UP_S) for r in results.values()) or 1
    total_tps = 0.0
    rows: list[dict[str, Any]] = []
    for tenant, result in results.items():
        done = [r for r in result.requests if r.sent + r.e2e_s >= WARM_UP_S]
        tps = sum(r.completion_tokens for r in done) / span
        total_tps += tps
        row: dict[str, Any] = {
            "run": run,
            "phase": name,
            "tenant": tenant,
            "requests": len(done),
            "tok_per_s": tps,
            "share": result.cost(WARM_UP_S) / total_cost,
        }
        if tenant == B and done:
            # Requests still waiting for a first token when the window closed count with the wait so
            # far (a lower bound): left out, a queue that holds B back would look short.
            ttft = [r.ttft_s * 1000 for r in done] + [s * 1000 for s in result.unanswered_s]
            e2e = [r.e2e_s * 1000 for r in done]
            row |= {
                "b_ttft_p50_ms": percentile(ttft, 50),
                "b_ttft_p95_ms": percentile(ttft, 95),
                "b_e2e_p50_ms": percentile(e2e, 50),
                "b_e2e_p95_ms": percentile(e2e, 95),
                "unanswered": len(result.unanswered_s),
            }
        row["refused"] = sum(result.refused.values())
        rows.append(row)
    # Each step of a batch of `batch` gives each of them one token: the step takes batch / tokens/s.
    # (The gaps between streamed chunks cannot tell it here: the demo model is so fast that a
    # response's tokens reach the client in a few bursts.)
    step_ms = 1000 * batch / total_tps if total_tps else float("nan")
    rows.append(
        {
            "run": run,
            "phase": name,
            "tenant": "total",
            "tok_per_s": total_tps,
            "batch": batch,
            "step_ms": step_ms,
        }
    )
    return rows


def bench(
    run: str, url: str, keys: dict[str, str], flood: dict[str, int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    phase(url, keys, {B: 1, A: 1}, 4, args)  # warm-up
    alone = phase(url, keys, {B: args.b_clients}, args.seconds, args)
    rows = report(run, "B alone", alone, args.seconds, args.b_clients)
    # Under the flood lorabox holds max_running (B's place on top comes and goes); vllm serve all.
    batch = sum(flood.values()) if run == "vllm" else args.max_running
    flooded = phase(url, keys, flood, args.seconds, args)
    rows += report(run, "B + A flood", flooded, args.seconds, batch)
    for row in rows:
        print("  " + " ".join(f"{k}={cell(v)}" for k, v in row.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--b-clients", type=int, default=2)
    parser.add_argument("--flood", type=int, default=10, help="A's concurrency as a multiple of B's")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--max-running", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", default="fair,fifo,fair-async")
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "llamacpp"])
    parser.add_argument("--llamacpp-parallel", type=int, default=8)
    parser.add_argument(
        "--base",
        action="store_true",
        help="both tenants ask for the base model: the scheduler's cost without the cost of mixing adapters",
    )
    parser.add_argument(
        "--out", type=Path, help="the results folder (default benchmarks/results/noisy-neighbour)"
    )
    args = parser.parse_args()
    results = Results("noisy-neighbour", {k: v for k, v in vars(args).items() if k != "out"}, folder=args.out)
    flood = {B: args.b_clients, A: args.b_clients * args.flood}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lorabox-noisy-") as tmp:
        demo_dir = Path(tmp)
        keys = box.build(demo_dir, args)
        base_config = (demo_dir / "lorabox.toml").read_text()
        for run in args.runs.split(","):
            if run == "vllm":
                print("vllm serve: the same model and adapters", flush=True)
                with vllm_served(demo_dir, demo_dir / "vllm.log", args) as url:
                    rows += bench(run, url, keys, flood, args)
                continue
            settings = RUNS[run] | {"max_running": args.max_running, "engine": args.engine}
            if args.engine == "llamacpp":
                settings["llamacpp_parallel"] = args.llamacpp_parallel
            # A's queue must hold its whole flood (the default bound, 32, would refuse some).
            (demo_dir / "lorabox.toml").write_text(
                base_config
                + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in settings.items())
                + "[tenant_defaults]\nmax_queued = 1000\n"
            )
            print(f"{run}: {settings}", flush=True)
            server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / f"server-{run}.log")
            try:
                rows += bench(run, server.url, keys, flood, args)
            finally:
                server.stop()
    results.add_table("B (2 clients) alone, then with A flooding", rows)
    flooded = {r["run"]: r for r in rows if r["phase"] == "B + A flood" and r["tenant"] == "total"}
    b_rows = {(r["run"], r["phase"]): r for r in rows if r["tenant"] == B}
    ratios = []
    for run in flooded:
        alone, under = b_rows.get((run, "B alone"), {}), b_rows.get((run, "B + A flood"), {})
        ratios.append(
            {
                "run": run,
                "tok_per_s_under_flood": flooded[run]["tok_per_s"],
                "vs_fair": ratio(flooded[run]["tok_per_s"], flooded["fair"]["tok_per_s"])
                if "fair" in flooded
                else "",
                "b_share_under_flood": under.get("share", float("nan")),
                "b_ttft_p95_alone_ms": alone.get("b_ttft_p95_ms", float("nan")),
                "b_ttft_p95_flood_ms": under.get("b_ttft_p95_ms", float("nan")),
            }
        )
    results.add_table("Per run: throughput under the flood, and what B sees", ratios)
    pairs = {
        "fair_over_fifo": ("fair", "fifo"),
        "fair_over_vllm_serve": ("fair", "vllm"),
        "commit_over_async": ("fair", "fair-async"),
    }
    for figure, (a, b) in pairs.items():
        if a in flooded and b in flooded:
            results.figures[f"tok_per_s_under_flood_{figure}"] = ratio(
                flooded[a]["tok_per_s"], flooded[b]["tok_per_s"]
            )
    for run in flooded:
        if (run, "B + A flood") in b_rows:
            results.figures[f"b_ttft_p95_under_flood_ms_{run}"] = b_rows[(run, "B + A flood")].get(
                "b_ttft_p95_ms", float("nan")
            )
    results.notes.append(
        "Fairness cost: tok_per_s_under_flood_fair_over_fifo is what the fair queue gives up in throughput "
        "(1.0 = nothing); B's TTFT under the flood is what it buys."
    )
    results.save()


if __name__ == "__main__":
    main()
