"""OpenAI request bodies: what is accepted, and which parameter each refusal names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from appliance.api.errors import APIError
from appliance.api.requests import parse_chat, parse_completion

USER = [{"role": "user", "content": "Hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "acme", "messages": USER} | fields


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "acme", "prompt": "Once upon"} | fields


def refused(parse: Any, body: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body)
    assert caught.value.status == 400
    assert caught.value.message
    return caught.value


# -- accepted -----------------------------------------------------------------------------------


def test_minimal_chat() -> None:
    parsed = parse_chat(chat())
    assert parsed.model == "acme"
    assert parsed.messages == USER
    assert parsed.prompt is None
    assert (parsed.stream, parsed.include_usage, parsed.user) == (False, False, None)
    options = parsed.options
    assert (options.max_tokens, options.temperature, options.top_p, options.seed, options.stop) == (
        None,
        1.0,
        1.0,
        None,
        (),
    )


def test_minimal_completion() -> None:
    parsed = parse_completion(completion())
    assert (parsed.model, parsed.prompt, parsed.messages) == ("acme", "Once upon", None)


def test_full_chat() -> None:
    parsed = parse_chat(
        chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "system", "content": "Really."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                },
                {"role": "assistant", "content": "Hi."},
            ],
            max_tokens=16,
            temperature=0,
            top_p=0.5,
            seed=7,
            stop=["\n", "END"],
            stream=True,
            stream_options={"include_usage": True},
            user="u-1",
            n=1,
            presence_penalty=0,
            frequency_penalty=0.0,
        )
    )
    assert parsed.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Really."},
        {"role": "user", "content": "Hel\nlo"},  # text parts are joined by newlines, as vLLM does
        {"role": "assistant", "content": "Hi."},
    ]
    options = parsed.options
    assert (options.max_tokens, options.temperature, options.top_p, options.seed) == (16, 0.0, 0.5, 7)
    assert options.stop == ("\n", "END")
    assert (parsed.stream, parsed.include_usage, parsed.user) == (True, True, "u-1")


def test_nulls_mean_defaults() -> None:
    parsed = parse_chat(
        chat(
            max_tokens=None,
            temperature=None,
            top_p=None,
            seed=None,
            stop=None,
            stream=None,
            n=None,
            user=None,
        )
    )
    assert parsed.options.temperature == 1.0
    assert parsed.options.max_tokens is None
    assert parsed.stream is False


def test_new_fields_at_their_neutral_values_are_accepted() -> None:
    parsed = parse_chat(chat(tools=[], logprobs=False, logit_bias={}, tool_choice=None, functions=None))
    assert (parsed.model, parsed.tools, parsed.options.logprobs, parsed.options.logit_bias) == (
        "acme",
        None,
        None,
        (),
    )


def test_unknown_fields_are_ignored() -> None:
    assert parse_chat(chat(foo=1, metadata={"a": "b"})).messages == USER
    assert parse_completion(completion(foo=1)).prompt == "Once upon"


def test_max_completion_tokens_is_preferred() -> None:
    assert parse_chat(chat(max_tokens=5, max_completion_tokens=7)).options.max_tokens == 7
    assert parse_chat(chat(max_completion_tokens=3)).options.max_tokens == 3
    assert parse_chat(chat(max_tokens=5)).options.max_tokens == 5


def test_stop_forms() -> None:
    assert parse_chat(chat(stop="END")).options.stop == ("END",)
    assert parse_chat(chat(stop="")).options.stop == ()
    assert parse_chat(chat(stop=[])).options.stop == ()
    assert parse_chat(chat(stop=["a", "", "b", "c"])).options.stop == ("a", "b", "c")


def test_completion_prompt_forms() -> None:
    assert parse_completion(completion(prompt=["Once upon"])).prompt == "Once upon"
    assert parse_completion(completion(prompt=[1, 2, 3])).prompt == [1, 2, 3]
    assert parse_completion(completion(prompt="")).prompt == ""


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [None, [], "text", 1, [{"model": "acme"}]])
@pytest.mark.parametrize("parse", [parse_chat, parse_completion])
def test_non_object_body(parse: Any, body: Any) -> None:
    error = refused(parse, body)
    assert error.param is None
    assert "JSON object" in error.message


DEEP: Any = []
for _ in range(70):
    DEEP = [DEEP]

CHAT_REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("model-missing", {"model": None}, "model"),
    ("model-empty", {"model": ""}, "model"),
    ("model-not-string", {"model": 3}, "model"),
    ("messages-missing", {"messages": None}, "messages"),
    ("messages-empty", {"messages": []}, "messages"),
    ("messages-not-list", {"messages": {"role": "user", "content": "Hi"}}, "messages"),
    ("messages-string", {"messages": "Hi"}, "messages"),
    ("message-not-object", {"messages": ["Hi"]}, "messages"),
    ("role-bad", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages"),
    ("role-missing", {"messages": [{"content": "Hi"}]}, "messages"),
    ("tool-message-without-id", {"messages": [{"role": "tool", "content": "Hi"}]}, "messages"),
    ("content-number", {"messages": [{"role": "user", "content": 5}]}, "messages"),
    ("content-missing", {"messages": [{"role": "user"}]}, "messages"),
    (
        "content-image",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages",
    ),
    (
        "content-part-not-text",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
        "messages",
    ),
    ("max_tokens-0", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens-negative", {"max_tokens": -1}, "max_tokens"),
    ("max_tokens-string", {"max_tokens": "10"}, "max_tokens"),
    ("max_tokens-float", {"max_tokens": 1.5}, "max_tokens"),
    ("max_tokens-bool", {"max_tokens": True}, "max_tokens"),
    ("max_completion_tokens-0", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ("temperature-high", {"temperature": 3}, "temperature"),
    ("temperature-negative", {"temperature": -0.1}, "temperature"),
    ("temperature-string", {"temperature": "hot"}, "temperature"),
    ("temperature-nan", {"temperature": float("nan")}, "temperature"),
    ("temperature-bool", {"temperature": True}, "temperature"),
    ("top_p-0", {"top_p": 0}, "top_p"),
    ("top_p-high", {"top_p": 1.01}, "top_p"),
    ("n-0", {"n": 0}, "n"),
    ("n-129", {"n": 129}, "n"),
    ("n-float", {"n": 2.5}, "n"),
    ("seed-string", {"seed": "7"}, "seed"),
    ("stop-5", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop-non-string", {"stop": ["a", 1]}, "stop"),
    ("stop-number", {"stop": 5}, "stop"),
    ("stop-too-long", {"stop": "x" * 1025}, "stop"),
    ("stop-one-of-list-too-long", {"stop": ["a", "x" * 1025]}, "stop"),
    ("stop-lone-surrogate", {"stop": ["ok", "\ud800"]}, "stop"),
    ("model-lone-surrogate", {"model": "acme\udfff"}, "model"),
    ("user-lone-surrogate", {"user": "u\ud800"}, "user"),
    ("content-lone-surrogate", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages"),
    (
        "text-part-lone-surrogate",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
        "messages",
    ),
    ("messages-text-too-long", {"messages": [{"role": "user", "content": "x" * (1 << 19)}] * 3}, "messages"),
    ("stream-yes", {"stream": "yes"}, "stream"),
    ("stream-1", {"stream": 1}, "stream"),
    ("stream_options-without-stream", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("stream_options-stream-false", {"stream": False, "stream_options": {}}, "stream_options"),
    ("stream_options-not-object", {"stream": True, "stream_options": True}, "stream_options"),
    ("include_usage-string", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("user-number", {"user": 5}, "user"),
    ("cache_salt", {"cache_salt": "x"}, "cache_salt"),
    ("cache_salt-null", {"cache_salt": None}, "cache_salt"),
    ("lora_request", {"lora_request": {"lora_name": "globex"}}, "lora_request"),
    ("functions", {"functions": [{"name": "f"}]}, "functions"),
    ("presence_penalty-out-of-range", {"presence_penalty": 3}, "presence_penalty"),
    ("presence_penalty-string", {"presence_penalty": "1"}, "presence_penalty"),
    ("frequency_penalty-out-of-range", {"frequency_penalty": -2.5}, "frequency_penalty"),
    ("repetition_penalty-0", {"repetition_penalty": 0}, "repetition_penalty"),
    ("repetition_penalty-high", {"repetition_penalty": 11}, "repetition_penalty"),
    ("logit_bias-list", {"logit_bias": [1, 2]}, "logit_bias"),
    ("logit_bias-word-key", {"logit_bias": {"hello": 5}}, "logit_bias"),
    ("logit_bias-negative-key", {"logit_bias": {"-1": 5}}, "logit_bias"),
    ("logit_bias-high", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("logit_bias-bool", {"logit_bias": {"5": True}}, "logit_bias"),
    ("logit_bias-too-many", {"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ("min_tokens-negative", {"min_tokens": -1}, "min_tokens"),
    ("min_tokens-over-max_tokens", {"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ("ignore_eos-string", {"ignore_eos": "yes"}, "ignore_eos"),
    ("logprobs-number", {"logprobs": 3}, "logprobs"),
    ("top_logprobs-without-logprobs", {"top_logprobs": 2}, "top_logprobs"),
    ("top_logprobs-21", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("response_format-string", {"response_format": "json"}, "response_format"),
    ("response_format-type", {"response_format": {"type": "xml"}}, "response_format"),
    ("json_schema-missing", {"response_format": {"type": "json_schema"}}, "response_format"),
    (
        "json_schema-name",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
        "response_format",
    ),
    (
        "json_schema-not-object",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}},
        "response_format",
    ),
    (
        "json_schema-too-deep",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"a": DEEP}}}},
        "response_format",
    ),
    ("tools-not-list", {"tools": {"type": "function"}}, "tools"),
    ("tools-not-function", {"tools": [{"type": "retrieval"}]}, "tools"),
    ("tools-bad-name", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ("tools-twice", {"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    (
        "tools-too-many",
        {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
        "tools",
    ),
    (
        "tools-parameters-list",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools",
    ),
    ("tool_choice-without-tools", {"tool_choice": "required"}, "tool_choice"),
    (
        "tool_choice-unknown-function",
        {
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    (
        "tool_choice-word",
        {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"},
        "tool_choice",
    ),
    ("parallel_tool_calls-string", {"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    (
        "tool_calls-arguments-not-json",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                    ],
                }
            ]
        },
        "messages",
    ),
    (
        "tool_calls-arguments-object",
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}
                    ],
                }
            ]
        },
        "messages",
    ),
]


@pytest.mark.parametrize(
    ("fields", "param"), [c[1:] for c in CHAT_REFUSALS], ids=[c[0] for c in CHAT_REFUSALS]
)
def test_chat_refusals_name_the_parameter(fields: dict[str, Any], param: str) -> None:
    body = chat(**fields)
    for name, value in fields.items():
        if value is None and name in ("model", "messages"):
            del body[name]
    assert refused(parse_chat, body).param == param


@pytest.mark.parametrize("param", ["functions", "best_of", "echo"])
def test_unsupported_features_have_a_code(param: str) -> None:
    value: Any = {"functions": [{"name": "f"}], "best_of": 2, "echo": True}[param]
    error = refused(parse_chat, chat(**{param: value}))
    assert error.code == "unsupported_parameter"
    assert param in error.message


def test_what_apps_send_is_parsed() -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    parsed = parse_chat(
        chat(
            messages=[
                *USER,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            n=3,
            presence_penalty=0.5,
            frequency_penalty=-1,
            repetition_penalty=1.2,
            logit_bias={"5": -100, "17": 42.5},
            min_tokens=2,
            ignore_eos=True,
            logprobs=True,
            top_logprobs=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": {"type": "object"}},
            },
            tools=[tool],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
        )
    )
    options = parsed.options
    assert (options.n, options.presence_penalty, options.frequency_penalty, options.repetition_penalty) == (
        3,
        0.5,
        -1,
        1.2,
    )
    assert (options.logit_bias, options.min_tokens, options.ignore_eos, options.logprobs) == (
        ((5, -100), (17, 42.5)),
        2,
        True,
        4,
    )
    assert parsed.content_schema == {"type": "object"}
    assert parsed.tools is not None
    assert (parsed.tools.choice, parsed.tools.parallel, parsed.tools.names) == (
        "get_weather",
        False,
        {"get_weather"},
    )
    assert parsed.messages[1] == {  # the arguments as an object, as chat templates take them
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
            }
        ],
    }
    assert parsed.messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert parse_chat(chat(logprobs=True)).options.logprobs == 0
    assert parse_chat(chat(response_format={"type": "json_object"})).content_schema == {"type": "object"}
    assert parse_chat(chat(response_format={"type": "text"})).content_schema is None
    completion_options = parse_completion(completion(logprobs=5, n=2)).options
    assert (completion_options.logprobs, completion_options.n) == (5, 2)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True}, "logprobs"),  # completions take a number
        ({"logprobs": 21}, "logprobs"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),  # chat only
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_completion_refusals_of_new_parameters(fields: dict[str, Any], param: str) -> None:
    assert refused(parse_completion, completion(**fields)).param == param


def test_the_model_and_tenant_checks_name_the_parameter() -> None:
    from appliance.api.requests import check_against_model

    options = parse_chat(chat(n=3, logit_bias={"700": 1}, min_tokens=5)).options
    with pytest.raises(APIError) as caught:
        check_against_model(options, vocab_size=640, max_n=4, max_tokens=10)
    assert caught.value.param == "logit_bias"
    options = parse_chat(chat(n=5)).options
    with pytest.raises(APIError) as caught:
        check_against_model(options, vocab_size=640, max_n=4, max_tokens=10)
    assert caught.value.param == "n"
    options = parse_chat(chat(min_tokens=50)).options
    with pytest.raises(APIError) as caught:
        check_against_model(options, vocab_size=640, max_n=4, max_tokens=10)
    assert caught.value.param == "min_tokens"
    check_against_model(parse_chat(chat(n=4, logit_bias={"639": 1})).options, 640, 4, 10)


def test_server_owned_field_message() -> None:
    error = refused(parse_completion, completion(cache_salt="other-tenant"))
    assert (error.param, error.code) == ("cache_salt", None)
    assert "set by the server" in error.message


def test_too_many_messages() -> None:
    error = refused(parse_chat, chat(messages=USER * 4097))
    assert error.param == "messages"


def test_refusal_names_the_failing_message_index() -> None:
    error = refused(parse_chat, chat(messages=[*USER, {"role": "user", "content": [{"type": "image_url"}]}]))
    assert "messages[1]" in error.message


COMPLETION_REFUSALS: list[tuple[str, Any, str]] = [
    ("missing", None, "prompt"),
    ("number", 5, "prompt"),
    ("empty-list", [], "prompt"),
    ("batch-of-two", ["Once", "upon"], "prompt"),
    ("mixed", ["Once", 1], "prompt"),
    ("nested-token-lists", [[1, 2]], "prompt"),
    ("bool-tokens", [True, False], "prompt"),
    ("float-tokens", [1.0, 2.0], "prompt"),
    ("lone-surrogate", "Once \ud800", "prompt"),
    ("lone-surrogate-in-list", ["Once \ud800"], "prompt"),
    ("text-too-long", "x" * ((1 << 20) + 1), "prompt"),
    ("too-many-token-ids", [1] * ((1 << 20) + 1), "prompt"),
]


@pytest.mark.parametrize(
    ("prompt", "param"), [c[1:] for c in COMPLETION_REFUSALS], ids=[c[0] for c in COMPLETION_REFUSALS]
)
def test_completion_refusals(prompt: Any, param: str) -> None:
    body = completion(prompt=prompt)
    if prompt is None:
        del body["prompt"]
    assert refused(parse_completion, body).param == param


def test_batched_prompts_message() -> None:
    assert "one prompt per request" in refused(parse_completion, completion(prompt=["a", "b"])).message


def test_completion_shares_the_common_checks() -> None:
    assert refused(parse_completion, completion(max_tokens=0)).param == "max_tokens"
    assert refused(parse_completion, completion(model="")).param == "model"
    assert refused(parse_completion, completion(echo=True)).param == "echo"
    assert refused(parse_completion, completion(suffix="x")).param == "suffix"


def test_request_size_limits_are_inclusive() -> None:
    parsed = parse_chat(
        chat(
            stop=["x" * 1024, "b", "c", "d"],
            messages=[{"role": "user", "content": "x" * (1 << 19)}] * 2,
        )
    )
    assert [len(s) for s in parsed.options.stop] == [1024, 1, 1, 1]
    assert len(parse_completion(completion(prompt="x" * (1 << 20))).prompt or "") == 1 << 20


def test_surrogate_pairs_are_text() -> None:
    """A JSON escaped pair is one astral character; only an unpaired half is refused."""
    body = json.loads('{"model": "acme", "messages": [{"role": "user", "content": "\\ud83c\\udf89"}]}')
    assert parse_chat(body).messages == [{"role": "user", "content": "🎉"}]
    error = refused(parse_chat, chat(messages=[*USER, {"role": "user", "content": "ok \ud83c"}]))
    assert "messages[1].content" in error.message
    assert "\\ud83c" in error.message
