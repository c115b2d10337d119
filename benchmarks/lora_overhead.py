"""LoRA overhead: the base model alone vs 1, 8 and 20 tenants' adapters mixed, under the same load.

    python -m benchmarks lora-overhead [--seconds 10] [--rounds 4] [--clients 8] [--max-tokens 64]
        [--mixes 0,1,8,20]

One `lorabox serve` (the vLLM engine) on the demo with 17 tenants added to its 3 (rank-8 adapters
on q_proj and v_proj, as the demo's, built by benchmarks/suite/box.py add_tenants), its adapter
slots sized by the residency planner as for any box. The same closed-loop load (`--clients`
streamed completions back to back, every answer `--max-tokens` long) is sent for each mix in turn:
0 = every request to the base model; N = requests cycling over N tenants' adapters, each under its
own key (the base model's requests come under the demo's three tenants' keys, those allowed it).
The mixes are measured in rounds, the order reversed every other round, so that whatever else the
machine runs hits each alike; a mix's throughput is over all its rounds, its ratio to the base
model's both over all rounds and as the median of the rounds' own ratios.

On a CPU box lorabox's vLLM engine runs base-model requests through an all-zero adapter (its CPU
LoRA kernels cannot mix adapter and no-adapter rows in one batch), so here the base model pays
the LoRA kernels too: the ratio is what mixing adapters costs over one. On a GPU the base runs
without.

Target (issue 23): 20 tenants mixed >= 0.92x the base model alone.

Here (2026-12-07, the 2-core AMD EPYC shared with other jobs; 8 clients, 64-token answers, 4 rounds
of 10 s; benchmarks/results/lora-overhead/): base model 651 tokens/s, 1 tenant 727, 8 tenants 669,
20 tenants 664: 20 mixed / base 1.02 over all rounds, 1.03 as the median of the rounds' ratios (the
target is met; on this CPU build the base pays the LoRA kernels too, see above, so this says that
mixing 20 adapters in a batch costs nothing measurable over one, not what a GPU's base gains).
The rounds' spread (base: 451-845 tokens/s) is the shared machine's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.demo.build import DEMO_MODEL_NAME, init_demo
from appliance.testing.localserver import LocalServer
from benchmarks.suite import loadgen
from benchmarks.suite.box import add_tenants
from benchmarks.suite.results import Results
from benchmarks.suite.stats import ratio

TARGET = 0.92


def mix_requests(
    keys: dict[str, str], base_keys: dict[str, str], mix: int, max_tokens: int
) -> Iterator[loadgen.Request]:
    """Requests cycling over the first `mix` tenants (by name); 0: the base model, under the keys
    of `base_keys` in turn (the demo's tenants: those allowed the base model)."""
    names = sorted(keys)
    if mix == 0:
        for request in loadgen.completions(base_keys, max_tokens=max_tokens):
            body = request.body | {"model": DEMO_MODEL_NAME}
            yield loadgen.Request(request.key, body, request.path, "base")
    else:
        yield from loadgen.completions({n: keys[n] for n in names[:mix]}, max_tokens=max_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10, help="per mix and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mixes", default="0,1,8,20")
    args = parser.parse_args()
    mixes = [int(m) for m in args.mixes.split(",")]
    results = Results("lora-overhead", vars(args))
    runs: dict[int, list[loadgen.Run]] = {m: [] for m in mixes}
    with tempfile.TemporaryDirectory(prefix="lorabox-lora-overhead-") as tmp:
        demo_dir = Path(tmp)
        keys = base_keys = init_demo(demo_dir)
        keys = keys | add_tenants(
            demo_dir, [f"t{i:02d}" for i in range(max(0, max(mixes) - len(keys)))], 1000
        )
        server = LocalServer.start(demo_dir / "lorabox.toml", demo_dir / "server.log", timeout_s=600)
        try:
            for mix in mixes:  # warm-up: each mix's adapters loaded, each batch size's first step
                for clients in (1, args.clients):
                    requests = mix_requests(keys, base_keys, mix, 16)
                    loadgen.run(functools.partial(loadgen.closed_loop, server.url, requests, clients, 2))
            for round_ in range(args.rounds):
                for mix in mixes if round_ % 2 == 0 else mixes[::-1]:
                    requests = mix_requests(keys, base_keys, mix, args.max_tokens)
                    run = loadgen.run(
                        functools.partial(
                            loadgen.closed_loop, server.url, requests, args.clients, args.seconds
                        )
                    )
                    runs[mix].append(run)
                    print(f"round {round_} mix {mix}: {run.summary()['tok_per_s']:.0f} tok/s", flush=True)
        finally:
            server.stop()
    rows: list[dict[str, Any]] = []
    base = None
    for mix in mixes:
        run = loadgen.Run([o for r in runs[mix] for o in r.outcomes], sum(r.seconds for r in runs[mix]))
        summary = run.summary()
        per_round = [r.summary()["tok_per_s"] for r in runs[mix]]
        if mix == mixes[0]:
            base = summary["tok_per_s"]
        rows.append(
            {"mix": "base model" if mix == 0 else f"{mix} tenants"}
            | {k: summary[k] for k in ("tok_per_s", "failed", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms")}
            | {"rounds_tok_per_s": ", ".join(f"{t:.0f}" for t in per_round)}
            | {"ratio_to_first": ratio(summary["tok_per_s"], base or 0.0)}
            # Within each round, against the first mix of that round: a drift in the machine's
            # load between rounds cancels out.
            | {
                "median_round_ratio": statistics.median(
                    ratio(t, runs[mixes[0]][i].summary()["tok_per_s"]) for i, t in enumerate(per_round)
                )
            }
        )
        for error in run.errors()[:2]:
            results.notes.append(f"mix {mix}: {error}")
    results.add_table(f"Throughput, {args.clients} clients, over {args.rounds} rounds", rows)
    if mixes[0] == 0 and max(mixes) > 0:
        results.figures[f"{max(mixes)} tenants mixed / base model, over all rounds"] = rows[-1][
            "ratio_to_first"
        ]
        results.figures[f"{max(mixes)} tenants mixed / base model, median of the rounds"] = rows[-1][
            "median_round_ratio"
        ]
        results.figures["target"] = TARGET
    results.plot(
        "throughput.png",
        {"completion tokens/s": [(m, r["tok_per_s"]) for m, r in zip(mixes, rows, strict=True)]},
        "tenants' adapters mixed (0: base model)",
        "tokens/s",
        f"lorabox, {args.clients} clients, demo model on CPU",
    )
    results.save()


if __name__ == "__main__":
    main()
