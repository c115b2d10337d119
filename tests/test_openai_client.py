"""The official openai client works unmodified against lorabox."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI


@pytest.fixture
def acme(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=server.demo.keys["acme"], max_retries=0)


def test_chat(acme, reference):
    messages = [{"role": "user", "content": "Hi there"}]
    response = acme.chat.completions.create(model="acme", messages=messages, max_tokens=8, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in ("length", "stop")
    expected = reference.generate("acme", reference.chat_ids(messages), 8)
    assert response.choices[0].message.content == reference.text(expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_with_include_usage(acme, reference):
    messages = [{"role": "user", "content": "Stream me something"}]
    stream = acme.chat.completions.create(
        model="acme",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = reference.generate("acme", reference.chat_ids(messages), 12)
    assert text == reference.text(expected)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].choices == []  # the usage chunk comes last, with no choices
    assert chunks[-1].usage.completion_tokens == len(expected)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_equals_non_streaming(acme):
    kwargs = {"model": "acme", "prompt": "The operator drops a folder", "max_tokens": 20, "temperature": 0}
    whole = acme.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in acme.completions.create(stream=True, **kwargs))
    assert streamed == whole


def test_stop_sequence_cuts_the_text(acme):
    full = acme.completions.create(model="acme", prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    stop = full[4:7]
    assert stop
    assert stop in full
    cut = acme.completions.create(model="acme", prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_list_shows_only_what_the_key_may_use(server, base_model_name):
    for tenant, key in server.demo.keys.items():
        ids = {m.id for m in OpenAI(base_url=server.base_url, api_key=key, max_retries=0).models.list()}
        assert ids == {tenant, f"{tenant}@v1", base_model_name}


def test_error_classes(server, acme):
    bad_key = OpenAI(base_url=server.base_url, api_key="lbx-nope-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.chat.completions.create(model="acme", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        acme.chat.completions.create(model="globex", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as excinfo:
        acme.chat.completions.create(model="acme", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert excinfo.value.body["param"] == "max_tokens"
