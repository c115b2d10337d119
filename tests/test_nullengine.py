"""The null engine (appliance/testing/nullengine.py): the engine protocol's promises without a model,
and `lorabox serve`'s whole path in front of it (python -m appliance.testing.nullserve), which the
gateway-ceiling benchmark measures."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from appliance.engines.base import EngineOptions, GenerationRequest, TokenDelta
from appliance.serving.tokenization import TextCodec
from appliance.testing.localserver import LocalServer, ServerFailed
from appliance.testing.nullengine import NullEngine
from appliance.testing.nullserve import TEXT
from tests.conftest import Demo

CYCLE = [11, 12, 13, 14, 15]


async def collect(engine: NullEngine, request: GenerationRequest) -> list[TokenDelta]:
    return [delta async for delta in engine.generate(request)]


def request(max_tokens: int, stop: tuple[int, ...] = ()) -> GenerationRequest:
    return GenerationRequest("r", [1, 2], max_tokens, stop_token_ids=stop)


async def test_max_tokens_ends_with_length() -> None:
    engine = NullEngine(EngineOptions(model=""), CYCLE)
    deltas = await collect(engine, request(7))
    assert [d.token_ids for d in deltas] == [[t] for t in CYCLE + CYCLE[:2]]
    assert [d.finish_reason for d in deltas] == [None] * 6 + ["length"]
    assert (engine.finished, engine.aborted, engine.running) == (1, 0, 0)


async def test_tokens_per_delta_groups_tokens_and_still_honours_max_tokens() -> None:
    engine = NullEngine(EngineOptions(model=""), CYCLE, tokens_per_delta=3)
    deltas = await collect(engine, request(7))
    assert [d.token_ids for d in deltas] == [[11, 12, 13], [14, 15, 11], [12]]
    assert deltas[-1].finish_reason == "length"


async def test_a_stop_token_ends_with_stop_and_is_sent() -> None:
    engine = NullEngine(EngineOptions(model=""), CYCLE, tokens_per_delta=2)
    deltas = await collect(engine, request(100, stop=(14, 99)))
    assert [d.token_ids for d in deltas] == [[11, 12], [13, 14]]
    assert deltas[-1].finish_reason == "stop"


async def test_closing_the_stream_aborts_the_request() -> None:
    engine = NullEngine(EngineOptions(model=""), CYCLE)
    stream = engine.generate(request(1000))
    assert (await anext(stream)).token_ids == [11]
    assert engine.running == 1
    await stream.aclose()
    assert (engine.running, engine.finished, engine.aborted) == (0, 0, 1)
    assert engine.stats().extra == {"finished": 0, "aborted": 1}


def test_it_needs_tokens_to_emit() -> None:
    with pytest.raises(ValueError, match="token ids"):
        NullEngine(EngineOptions(model=""), [])


@pytest.fixture(scope="module")
def null_server(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalServer, Path]]:
    """The shared demo served with the null engine: its model (only read), a copy of its adapters
    and of its database (the shared `server` holds the demo's own state), ready in seconds."""
    directory = tmp_path_factory.mktemp("null-demo")
    shutil.copytree(demo.dir / "adapters", directory / "adapters")
    (directory / "state").mkdir()
    with (
        sqlite3.connect(demo.database) as source,
        sqlite3.connect(directory / "state" / "lorabox.db") as copy,
    ):
        source.backup(copy)
    config = demo.config.read_text()
    config = config.replace(str(demo.dir / "adapters"), str(directory / "adapters"))
    config = config.replace(str(demo.dir / "state"), str(directory / "state"))
    (directory / "lorabox.toml").write_text(config)
    command = [sys.executable, "-m", "appliance.testing.nullserve"]
    try:
        server = LocalServer.start(directory / "lorabox.toml", directory / "server.log", command=command)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    yield server, directory
    server.stop()


def test_the_daemon_serves_through_the_null_engine(demo: Demo, null_server: tuple[LocalServer, Path]) -> None:
    server, _ = null_server
    keys = demo.keys
    with urllib.request.urlopen(f"{server.url}/readyz") as response:  # noqa: S310 (loopback)
        assert json.load(response)["engine"] == "null"
    codec = TextCodec.from_model_dir(demo.model_dir)
    cycle = codec.tokenizer.encode(TEXT, add_special_tokens=False)
    client = openai.OpenAI(base_url=server.base_url, api_key=keys["acme"])
    stream = client.completions.create(
        model="acme", prompt="Hello", max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == codec.decode((cycle * 2)[:40])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40
    # The gateway's own work still applies in front of it: a stop string cuts the text.
    chat = openai.OpenAI(base_url=server.base_url, api_key=keys["globex"]).chat.completions.create(
        model="globex", messages=[{"role": "user", "content": "Hi"}], max_tokens=40, stop=[" fox"]
    )
    assert chat.choices[0].message.content == TEXT.split(" fox")[0]
    assert chat.choices[0].finish_reason == "stop"
