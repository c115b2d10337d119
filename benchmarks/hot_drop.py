"""Hot drop: an adapter dropped → its first answer equal to HF transformers + PEFT's, p50/p95.

A new adapter version dropped into adapters/<tenant>/<version>/, timed until the first answer equal
to HF transformers + PEFT's, over `--drops` drops.

    python -m benchmarks hot-drop [--drops 20] [--engine vllm|llamacpp] [--max-tokens 16]

One demo daemon. Each drop is a new tenant (registered first, as an operator would with `lorabox
tenant add`) whose adapter is built under a dot name beside its final folder and renamed into
place, as operators are told to; the reference answer is computed before the rename, so the clock
covers only the daemon: from the rename until a greedy completion returns exactly the reference's
text (polled every 10 ms; a 404 or an answer from nothing yet counts as not yet). Then every tenant
already dropped gets a new version `v2` the same way (a version switch rather than a first adapter),
timed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from appliance.demo.build import DemoTenant, build_adapter
from appliance.tenancy.store import Store
from appliance.testing.localserver import LocalServer
from appliance.testing.reference import PeftReference
from benchmarks.suite import box
from benchmarks.suite.results import Results
from benchmarks.suite.stats import percentile

PROMPT = "The quick brown fox"


async def first_correct(url: str, key: str, model: str, expected: str, max_tokens: int) -> int:
    """Polls until the answer equals `expected`; returns the number of requests it took."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    polls = 0
    async with aiohttp.ClientSession() as session:
        while True:
            polls += 1
            async with session.post(
                f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as response:
                if response.status == 200 and (await response.json())["choices"][0]["text"] == expected:
                    return polls
                await response.read()
            await asyncio.sleep(0.01)


def drop(
    url: str,
    demo_dir: Path,
    reference: PeftReference,
    name: str,
    version: str,
    seed: int,
    key: str,
    max_tokens: int,
) -> dict[str, float | str | int]:
    staging = demo_dir / "adapters" / name / f".{version}.partial"
    build_adapter(reference.model_dir, DemoTenant(name, 8, 16, ("q_proj", "v_proj"), seed), staging)
    expected = reference.text(reference.generate(staging, reference.prompt_ids(PROMPT), max_tokens))
    dropped = time.perf_counter()
    staging.rename(staging.with_name(version))
    polls = asyncio.run(first_correct(url, key, name, expected, max_tokens))
    took = time.perf_counter() - dropped
    return {"tenant": name, "version": version, "servable_ms": took * 1000, "polls": polls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=20)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "llamacpp"))
    parser.add_argument("--max-tokens", type=int, default=16)
    box.add_arguments(parser)
    args = parser.parse_args()
    results = Results("hot-drop", vars(args))
    rows: list[dict[str, float | str | int]] = []
    with tempfile.TemporaryDirectory(prefix="lorabox-drop-") as tmp:
        demo_dir = Path(tmp)
        box.build(demo_dir, args)
        names = [f"drop{i:03d}" for i in range(args.drops)]
        with Store.open(demo_dir / "state" / "lorabox.db") as store:
            keys = {}
            for name in names:
                store.add_tenant(name)
                keys[name] = store.issue_key(name).plaintext
        reference = PeftReference(box.model_dir(demo_dir, args))
        server = LocalServer.start(
            demo_dir / "lorabox.toml", demo_dir / "server.log", env={"LORABOX_ENGINE": args.engine}
        )
        try:
            for version, offset in (("v1", 50_000), ("v2", 60_000)):
                for i, name in enumerate(names):
                    rows.append(
                        drop(
                            server.url,
                            demo_dir,
                            reference,
                            name,
                            version,
                            offset + i,
                            keys[name],
                            args.max_tokens,
                        )
                    )
                    print(f"{name} {version}: {rows[-1]['servable_ms']:.0f} ms", flush=True)
        finally:
            server.stop()

    summary = []
    for version, what in (("v1", "first adapter of a new tenant"), ("v2", "new version of a served tenant")):
        took = [float(r["servable_ms"]) for r in rows if r["version"] == version]
        summary.append(
            {
                "drop": what,
                "drops": len(took),
                "p50_ms": percentile(took, 50),
                "p95_ms": percentile(took, 95),
                "max_ms": max(took),
            }
        )
        results.figures[f"{version}_p50_ms"] = percentile(took, 50)
        results.figures[f"{version}_p95_ms"] = percentile(took, 95)
    results.add_table(f"Drop → first answer equal to HF+PEFT ({args.engine})", summary)
    results.add_table("Each drop", rows)
    results.plot(
        "drops.png",
        {
            version: [
                (i + 1, float(r["servable_ms"]))
                for i, r in enumerate(r for r in rows if r["version"] == version)
            ]
            for version in ("v1", "v2")
        },
        "drop",
        "ms to first correct answer",
        "Hot drop → servable",
    )
    results.save()


if __name__ == "__main__":
    main()
