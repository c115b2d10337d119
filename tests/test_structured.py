"""The grammar layer (serving/structured.py): schema caps, llguidance's verdicts with the reason,
a cache per grammar, a time bound, one compilation per tenant at a time."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from appliance.demo.build import DEMO_DATA_DIR
from appliance.engines.base import Grammar
from appliance.serving.structured import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    GrammarCompiler,
    GrammarRefused,
    check_schema,
    json_schema_grammar,
)
from appliance.serving.tokenization import TextCodec


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.from_model_dir(DEMO_DATA_DIR / "model")


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


def test_schema_caps() -> None:
    assert check_schema(nested(MAX_SCHEMA_DEPTH // 2), "s")
    with pytest.raises(GrammarRefused, match="nested too deeply"):
        check_schema(nested(MAX_SCHEMA_DEPTH + 5), "s")
    with pytest.raises(GrammarRefused, match="nested too deeply"):
        check_schema(nested(5000), "s")  # deeper than Python's recursion limit: still a plain refusal
    big = {"enum": ["x" * 100] * (MAX_SCHEMA_BYTES // 100)}
    with pytest.raises(GrammarRefused, match="too large"):
        check_schema(big, "s")
    with pytest.raises(GrammarRefused, match="JSON object"):
        check_schema([{"type": "string"}], "s")


def test_refusals_say_why_and_are_cached(codec) -> None:
    compiler = GrammarCompiler(codec.llg_tokenizer)
    unsupported = json_schema_grammar({"type": "array", "uniqueItems": True})

    async def run() -> None:
        for _ in range(3):
            with pytest.raises(GrammarRefused, match="uniqueItems"):
                await compiler.check(unsupported, "acme")
        with pytest.raises(GrammarRefused, match="no output can satisfy it"):
            await compiler.check(
                json_schema_grammar({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}), "acme"
            )
        await compiler.check(
            json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}), "acme"
        )
        await compiler.check(
            json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}), "globex"
        )

    asyncio.run(run())
    assert compiler.compilations == 3  # each grammar once, whoever asks and however often
    compiler.close()


def test_a_grammar_past_the_time_bound_is_refused_for_good(codec) -> None:
    compiler = GrammarCompiler(codec.llg_tokenizer, timeout_s=0.001)
    # 800 optional properties: about 0.2 s of compiling, far past 1 ms on any machine.
    slow = json_schema_grammar(
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(800)}}
    )

    async def run() -> None:
        with pytest.raises(GrammarRefused, match=r"longer than 0\.001 s"):
            await compiler.check(slow, "acme")
        with pytest.raises(GrammarRefused, match=r"longer than 0\.001 s"):
            await compiler.check(slow, "acme")  # remembered, not compiled again

    asyncio.run(run())
    compiler.close()


def test_a_tenant_compiles_one_grammar_at_a_time(codec, monkeypatch) -> None:
    """A tenant's grammars queue behind each other; another tenant's go past them."""
    compiler = GrammarCompiler(codec.llg_tokenizer, threads=2)
    started: list[str] = []
    release = threading.Event()
    real = compiler._run

    def gated(grammar: Grammar) -> str:
        started.append(json.loads(grammar.text)["title"])
        release.wait(10)
        return real(grammar)

    monkeypatch.setattr(compiler, "_run", gated)

    async def run() -> None:
        def schema(title: str) -> Grammar:
            return json_schema_grammar({"title": title, "type": "integer"})

        first = asyncio.create_task(compiler.check(schema("acme-1"), "acme"))
        second = asyncio.create_task(compiler.check(schema("acme-2"), "acme"))
        other = asyncio.create_task(compiler.check(schema("globex-1"), "globex"))
        async with asyncio.timeout(10):
            while len(started) < 2:  # noqa: ASYNC110 (threads report by appending)
                await asyncio.sleep(0.01)
        assert sorted(started) == ["acme-1", "globex-1"]  # acme's second waits for its first
        release.set()
        await asyncio.gather(first, second, other)
        assert started[-1] == "acme-2"

    asyncio.run(run())
    compiler.close()


def test_the_event_loop_keeps_running_while_a_grammar_compiles(codec) -> None:
    compiler = GrammarCompiler(codec.llg_tokenizer)
    heavy = json_schema_grammar(
        {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(600)}}
    )

    async def run() -> int:
        ticks = 0
        task = asyncio.create_task(compiler.check(heavy, "acme"))
        while not task.done():
            await asyncio.sleep(0.001)
            ticks += 1
        await task
        return ticks

    assert asyncio.run(run()) > 5  # the loop went round while llguidance worked on its thread
    compiler.close()
