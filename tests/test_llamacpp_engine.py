"""The llama.cpp engine in-process (it starts in well under a second on the demo model).

What the HTTP tests cannot see: a closed stream stops its request, a dead worker thread is reported
through `failure()`, adapters beyond the resident bound are reloaded (pinned ones stay), and an
adapter unloaded while in use is freed only once its last request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.demo.build import DEMO_TENANTS
from appliance.engines.base import AdapterRef, EngineOptions, GenerationRequest
from appliance.engines.llamacpp import LlamaCppEngine, default_threads
from appliance.errors import EngineDead
from appliance.gguf.export import quantize
from tests.conftest import Demo, Reference

PROMPT = "The quick brown fox"
TENANTS = [t.name for t in DEMO_TENANTS]


def test_the_default_threads_leave_a_core_to_the_daemon() -> None:
    """One per physical core the process may use, less one, at least one (physical, available)."""
    cases = {(2, 2): 1, (1, 1): 1, (16, 32): 15, (16, 4): 3, (8, None): 7, (None, None): 1, (4, 0): 3}
    assert {case: default_threads(*case) for case in cases} == cases


def ref(demo: Demo, tenant: str) -> AdapterRef:
    return AdapterRef(f"{tenant}@v1", str(demo.adapter_dir(tenant)))


@contextlib.asynccontextmanager
async def running(
    demo: Demo, tmp_path: Path, gguf_model: Path | None = None, **changes: int
) -> AsyncIterator[LlamaCppEngine]:
    options = EngineOptions(
        model=str(demo.model_dir),
        gguf_model=str(gguf_model or demo.dir / "model.gguf"),
        dtype="float32",
        cache_dir=str(tmp_path),
        **({"max_model_len": 1024, "parallel": 2, "max_cpu_loras": 8, "threads": 2} | changes),
    )
    engine = LlamaCppEngine(options)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def generate(
    engine: LlamaCppEngine, prompt_ids: list[int], adapter: AdapterRef | None, n: int
) -> list[int]:
    request = GenerationRequest("r", prompt_ids, n, temperature=0, adapter=adapter, cache_salt="t")
    return [token async for delta in engine.generate(request) for token in delta.token_ids]


async def wait_idle(engine: LlamaCppEngine) -> None:
    async with asyncio.timeout(10):
        while engine.stats().running_requests:  # noqa: ASYNC110 (a counter; no event to await)
            await asyncio.sleep(0.01)


async def test_closing_a_stream_stops_its_request(demo, reference, tmp_path):
    # A long context, so that running to the end would take the engine seconds.
    async with running(demo, tmp_path, max_model_len=8192) as engine:
        max_tokens = 8000
        request = GenerationRequest("long", reference.prompt_ids(PROMPT), max_tokens, temperature=0)
        stream = engine.generate(request)
        first = await anext(stream)
        await stream.aclose()  # what the server does when the client goes away
        await wait_idle(engine)
        produced = engine.stats().extra["generated_tokens"]
        assert first.token_ids
        assert produced < max_tokens / 2, produced
        # The sequence it held serves the next request at once.
        assert await generate(engine, reference.prompt_ids(PROMPT), None, 8) == reference.generate(
            None, reference.prompt_ids(PROMPT), 8
        )


async def test_a_dead_worker_thread_is_reported(demo, reference, tmp_path):
    async with running(demo, tmp_path) as engine:
        assert engine.failure() is None
        await asyncio.wait_for(engine.probe(), 5)  # the health probe's round trip answers
        worker = engine._worker
        assert worker is not None

        def broken_step() -> None:
            raise RuntimeError("simulated fault in a decode step")

        worker._step = broken_step  # type: ignore[method-assign]
        with pytest.raises(EngineDead, match="simulated fault"):
            await generate(engine, reference.prompt_ids(PROMPT), None, 4)
        assert "simulated fault" in (engine.failure() or "")
        with pytest.raises(EngineDead):  # and so does every later request, at once
            await generate(engine, reference.prompt_ids(PROMPT), None, 4)
        with pytest.raises(EngineDead):  # and the health probe
            await engine.probe()


async def test_adapters_beyond_the_resident_bound_are_reloaded_and_pins_stay(
    demo, reference: Reference, tmp_path
):
    ids = reference.prompt_ids(PROMPT)
    async with running(demo, tmp_path, max_cpu_loras=2) as engine:
        for tenant in TENANTS:
            await engine.load_adapter(ref(demo, tenant))
        await engine.pin_adapter(ref(demo, TENANTS[0]))
        for tenant in [*TENANTS, *reversed(TENANTS), *TENANTS]:
            assert await generate(engine, ids, ref(demo, tenant), 8) == reference.generate(tenant, ids, 8), (
                tenant
            )
            stats = engine.stats()
            assert stats.extra["resident_adapters"] <= 2
            assert stats.pinned == [f"{TENANTS[0]}@v1"]
            assert engine._worker is not None
            assert engine._worker.adapters[f"{TENANTS[0]}@v1"].handle is not None  # never evicted
        assert sorted(stats.loaded_adapters) == sorted(f"{t}@v1" for t in TENANTS)


async def test_an_adapter_unloaded_while_in_use_finishes_its_request_first(demo, reference, tmp_path):
    ids = reference.prompt_ids(PROMPT)
    tenant = TENANTS[1]
    async with running(demo, tmp_path) as engine:
        await engine.load_adapter(ref(demo, tenant))
        request = GenerationRequest("r", ids, 12, temperature=0, adapter=ref(demo, tenant))
        stream = engine.generate(request)
        tokens = list((await anext(stream)).token_ids)
        await engine.unload_adapter(ref(demo, tenant))
        tokens += [t async for delta in stream for t in delta.token_ids]
        assert tokens == reference.generate(tenant, ids, 12)
        assert engine.stats().loaded_adapters == []


async def test_seeded_sampling_repeats_and_greedy_ignores_the_seed(demo, reference, tmp_path):
    ids = reference.prompt_ids(PROMPT)

    async def sample(seed: int, temperature: float) -> list[int]:
        request = GenerationRequest("s", ids, 16, temperature=temperature, seed=seed)
        return [t async for delta in engine.generate(request) for t in delta.token_ids]

    # The trained demo model is confident: only a hot temperature makes seeds disagree.
    async with running(demo, tmp_path) as engine:
        assert await sample(7, 8.0) == await sample(7, 8.0)
        assert len({tuple(await sample(seed, 8.0)) for seed in range(4)}) > 1
        assert await sample(1, 0.0) == await sample(2, 0.0) == reference.generate(None, ids, 16)


async def test_a_bad_prompt_fails_alone(demo, reference, tmp_path):
    ids = reference.prompt_ids(PROMPT)
    async with running(demo, tmp_path, max_model_len=256) as engine:
        good = asyncio.ensure_future(generate(engine, ids, None, 32))
        for bad, message in [
            ([], "empty"),
            ([1] * 300, "a sequence holds"),
            ([*ids, 10**6], "outside the vocab"),
        ]:
            with pytest.raises(ValueError, match=message):
                await generate(engine, bad, None, 4)
        assert await good == reference.generate(None, ids, 32)


async def test_a_quantised_gguf_of_the_base_serves_with_adapters_converted_against_it(
    demo, reference, tmp_path
):
    quantised = tmp_path / "model-q8_0.gguf"
    await asyncio.to_thread(quantize, demo.dir / "model.gguf", quantised, "q8_0")
    # The demo's adapters give each tenant its voice in chats; plain text continues alike.
    ids = reference.chat_ids([{"role": "user", "content": "Hello!"}])
    async with running(demo, tmp_path, gguf_model=quantised) as engine:
        base = await generate(engine, ids, None, 12)
        adapted = await generate(engine, ids, ref(demo, TENANTS[1]), 12)
        assert engine.stats().extra["model"] == str(quantised)
    assert len(base) == len(adapted) == 12
    assert adapted != base  # the adapter applies on the quantised weights
