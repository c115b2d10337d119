"""A streamed text chunk written from its choice's template is byte for byte the chunk built and
encoded whole (api/shapes.py: Shape.text_event, the gateway's hot path)."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.api.shapes import Shape, sse
from appliance.engines.base import TokenLogprob
from appliance.serving.generator import TextChunk
from appliance.serving.tools import CallOut

TEXTS = ["Hello", " world", 'a "quoted" \\ back\\slash', "line\nbreak\ttab", "é 日本 😀", "\x00\x1f", "</s>"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("extra", [{}, {"usage": None}])
def test_a_text_chunk_from_the_template_is_the_chunk_encoded_whole(chat: bool, extra: dict[str, Any]) -> None:
    shape = Shape(chat, 'tenant-"x"', codec=None, logprobs=False)  # type: ignore[arg-type]
    for index in (0, 1, 0, 2):
        for text in TEXTS:
            chunk = TextChunk(text, index=index)
            assert shape.text_event(chunk, extra) == sse(shape.chunks(chunk)[0] | extra)


@pytest.mark.parametrize(
    "chunk",
    [
        TextChunk(""),
        TextChunk("done", finish_reason="stop"),
        TextChunk("x", logprobs=[TokenLogprob(5, -0.1)]),
        TextChunk("", calls=[CallOut(0, "call_1", "f", ("{}",))]),
    ],
)
def test_any_other_chunk_is_built_whole(chunk: TextChunk) -> None:
    assert Shape(True, "m", codec=None, logprobs=False).text_event(chunk, {}) is None  # type: ignore[arg-type]


def test_a_stream_with_logprobs_is_built_whole() -> None:
    assert Shape(False, "m", codec=None, logprobs=True).text_event(TextChunk("x"), {}) is None  # type: ignore[arg-type]
