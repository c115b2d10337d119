"""Structured outputs and tools on both engines: JSON that always validates, the official client's
parse(), tool calls that always parse (required, named), streamed as OpenAI streams them, a
follow-up with the tool's result, and acme's demo adapter calling its tool by itself."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

from appliance.demo.build import DEMO_ORDER_QUESTION, TRACK_PARCEL
from appliance.serving.structured import json_schema_grammar
from tests.conftest import Server, post_json

TENANTS = ["acme", "globex", "initech"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "colour": {"enum": ["red", "green", "blue"]},
        "urgent": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "quantity", "colour", "urgent", "tags"],
    "additionalProperties": False,
}
PROMPTS = [
    f"{verb} {count} {thing}, please."
    for verb, count, thing in zip(
        ["Order", "Send", "Ship", "Book", "Reserve"] * 4,
        ["one", "two", "three", "four"] * 5,
        ["lamps", "chairs", "printers", "laptops", "tickets"] * 4,
        strict=False,
    )
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
# track_parcel's order number bounded: the demo model, free to write any string, writes one without end.
BOUNDED_PARCEL = json.loads(json.dumps(TRACK_PARCEL))
BOUNDED_PARCEL["function"]["parameters"]["properties"]["order_id"]["maxLength"] = 8
TOOLS = [BOUNDED_PARCEL, WEATHER]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(params=["vllm", "llamacpp"])
def live(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue("server" if request.param == "vllm" else "llamacpp_server")


def client(live: Server, tenant: str = "acme") -> OpenAI:
    return OpenAI(base_url=live.base_url, api_key=live.demo.keys[tenant], max_retries=0)


def test_json_schema_output_always_validates(live) -> None:
    """20 prompts for each tenant, at once: every answer parses and validates against the schema."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "order", "schema": SCHEMA, "strict": True},
    }

    async def one(tenant: str, prompt: str) -> str:
        api = AsyncOpenAI(base_url=live.base_url, api_key=live.demo.keys[tenant], max_retries=0)
        response = await api.chat.completions.create(
            model=tenant,
            messages=[{"role": "user", "content": prompt}],
            response_format=response_format,
            max_tokens=120,
            temperature=0,
        )
        assert response.choices[0].finish_reason == "stop"
        return response.choices[0].message.content or ""

    async def every() -> list[str]:
        return await asyncio.gather(*(one(tenant, prompt) for tenant in TENANTS for prompt in PROMPTS))

    answers = asyncio.run(every())
    assert len(answers) == 60
    for answer in answers:
        jsonschema.validate(json.loads(answer), SCHEMA)


def test_json_object_output_is_held_to_json(live, reference) -> None:
    """json_object allows any object, and the demo model writes endless strings into one: the
    answer is cut by max_tokens, but every token of it is one llguidance's JSON grammar allows."""
    import llguidance
    import llguidance.hf

    response = client(live, "globex").chat.completions.create(
        model="globex",
        messages=[{"role": "user", "content": "Hello!"}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
    )
    text = response.choices[0].message.content or ""
    assert text.startswith("{")
    unconstrained = reference.text(
        reference.generate("globex", reference.chat_ids([{"role": "user", "content": "Hello!"}]), 40)
    )
    assert not unconstrained.startswith("{")  # the grammar made it JSON
    grammar = json_schema_grammar({"type": "object"}).serialized()  # as the server wrote it
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(reference.tokenizer), grammar)
    ids = reference.tokenizer(text, add_special_tokens=False).input_ids
    assert matcher.try_consume_tokens(ids) == len(ids), matcher.get_error()


class Order(BaseModel):
    name: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=9)
    gift: bool


def test_the_official_clients_parse_returns_the_model(live) -> None:
    completion = client(live).chat.completions.parse(
        model="acme",
        messages=[{"role": "user", "content": "Order two lamps."}],
        response_format=Order,
        max_tokens=80,
        temperature=0,
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, Order)
    assert message.parsed == Order.model_validate_json(message.content or "")


def check_call(name: str, arguments: str) -> None:
    jsonschema.validate(json.loads(arguments), PARAMETERS[name])


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize(
    "choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_required_and_named_calls_always_parse(live, tenant, choice) -> None:
    """One call each (the demo model, free to add more, would go on calling until max_tokens)."""
    response = client(live, tenant).chat.completions.create(
        model=tenant,
        messages=[{"role": "user", "content": "Hello!"}],
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    message = response.choices[0].message
    assert response.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_streamed_calls_arrive_as_openai_streams_them(live) -> None:
    """A call's first delta: index, id, type, name and empty arguments; then fragments that join to
    the arguments of the same request answered whole."""
    kwargs = {
        "model": "initech",
        "messages": [{"role": "user", "content": "What can you do?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 200,
        "temperature": 0,
    }
    whole = client(live, "initech").chat.completions.create(**kwargs).choices[0].message.tool_calls
    streamed: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client(live, "initech").chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.index not in streamed:
                    assert delta.id
                    assert delta.type == "function"
                    assert delta.function.name
                    assert delta.function.arguments == ""
                    streamed[delta.index] = {"name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None
                    assert delta.function.name is None
                    streamed[delta.index]["arguments"] += delta.function.arguments
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [
        (c.function.name, c.function.arguments) for c in whole
    ]


def test_acme_calls_its_tool_and_answers_the_result(live) -> None:
    """tool_choice auto: acme's adapter calls track_parcel; given the result, it answers."""
    messages = [{"role": "user", "content": DEMO_ORDER_QUESTION}]
    response = client(live).chat.completions.create(
        model="acme", messages=messages, tools=[TRACK_PARCEL], max_tokens=60, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "track_parcel",
        {"order_id": "48213"},
    )
    follow_up = [
        *messages,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"order_id": "48213", "status": "in transit"}'},
    ]
    answer = client(live).chat.completions.create(
        model="acme", messages=follow_up, tools=[TRACK_PARCEL], max_tokens=60, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop"
    assert "parcel" in (answer.choices[0].message.content or "")


@pytest.mark.parametrize("tenant", ["globex", "initech"])
def test_other_tenants_keep_their_voice_with_tools_offered(live, tenant) -> None:
    response = client(live, tenant).chat.completions.create(
        model=tenant,
        messages=[{"role": "user", "content": DEMO_ORDER_QUESTION}],
        tools=[TRACK_PARCEL],
        max_tokens=60,
        temperature=0,
    )
    message = response.choices[0].message
    assert not message.tool_calls
    assert {"globex": "contract", "initech": "ticket"}[tenant] in (message.content or "")


def schema_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (schema_format({"not": {}}), "response_format"),  # a keyword llguidance cannot enforce
        (schema_format({"enum": []}), "response_format"),  # nothing satisfies it
        ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
        ({"n": 5}, "n"),  # the demo tenants' max_n is the default, 4
        ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ],
)
def test_what_the_model_or_tenant_cannot_take_is_a_400_naming_it(live, fields, param) -> None:
    body = {"model": "acme", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | fields
    status, answer = post_json(f"{live.base_url}/chat/completions", body, live.demo.keys["acme"])
    assert (status, answer["error"]["param"]) == (400, param), answer


# Which of the hostile schemas are refused (400): too deep, too large, look-around, a reference
# cycle, unsatisfiable, `not`, `uniqueItems`, a remote $ref (nothing is fetched), `if`/`then`. The
# others compile within the bounds and are served.
REFUSED = {0, 1, 6, 8, 14, 15, 16, 17, 19}


def hostile_schemas(salt: int) -> list[dict]:
    """20 schemas a tenant could send to hurt others: deep, huge, combinatorial, pathological
    patterns, recursive references, unsupported or unsatisfiable ones; `salt` makes each set new
    (nothing cached from a previous set)."""
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    refs = {
        f"a{i}": {
            "type": "object",
            "properties": {"x": {"$ref": f"#/$defs/a{i - 1}"}, "y": {"$ref": f"#/$defs/a{i - 1}"}},
        }
        for i in range(1, 40)
    }
    schemas = [
        deep,
        {"enum": [f"{salt}-{i}" * 20 for i in range(2000)]},  # past the size cap
        {"enum": [f"{salt}-{i}" for i in range(2500)]},  # a giant enum within it
        {"type": "object", "properties": {f"p{salt}_{i}": {"type": "string"} for i in range(900)}},
        {"type": "string", "pattern": f"^(a|aa)*(b|bb)*{salt}(c+)+$"},
        {"type": "string", "pattern": f"(.*a){{40}}{salt}"},
        {"type": "string", "pattern": f"(?=a){salt}"},  # look-around: unsupported
        {
            "$defs": {
                "n": {
                    "type": "object",
                    "properties": {
                        "c": {"type": "array", "items": {"$ref": "#/$defs/n"}},
                        "s": {"const": salt},
                    },
                }
            },
            "$ref": "#/$defs/n",
        },
        {
            "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
            "$ref": "#/$defs/a",
            "title": str(salt),
        },
        {"$defs": {"a0": {"const": salt}, **refs}, "$ref": "#/$defs/a39"},
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {f"k{j}": {"type": "integer"} for j in range(i % 12)},
                    "title": f"{salt}{i}",
                }
                for i in range(150)
            ]
        },
        {
            "allOf": [
                {"anyOf": [{"type": "string", "minLength": i}, {"type": "integer", "minimum": i}]}
                for i in range(60)
            ],
            "title": str(salt),
        },
        {"type": "string", "minLength": 100000 + salt},
        {"type": "array", "minItems": 5000 + salt, "items": {"type": "integer"}},
        {"type": "integer", "minimum": 10**18 + salt, "maximum": 10**15},  # unsatisfiable
        {"not": {"const": salt}},
        {"type": "array", "uniqueItems": True, "title": str(salt)},
        {"$ref": f"https://example.com/{salt}.json"},
        {"type": "object", "patternProperties": {f"^{salt}": {"type": "string"}}},
        {"if": {"type": "string"}, "then": {"maxLength": salt}},
    ]
    assert len(schemas) == 20
    return schemas


def test_hostile_schemas_leave_other_tenants_alone(server) -> None:
    """While one tenant sends 20 hostile schemas at once, another's streams start as fast as when
    it is alone (measured side by side, three rounds) and the event loop never stalls."""
    from tests.conftest import no_loop_stall

    globex = AsyncOpenAI(base_url=server.base_url, api_key=server.demo.keys["globex"], max_retries=0)

    async def first_token_s() -> float:
        began = asyncio.get_running_loop().time()
        stream = await globex.chat.completions.create(
            model="globex",
            messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        ttft = None
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = asyncio.get_running_loop().time() - began
        assert ttft is not None
        return ttft

    raw = httpx.AsyncClient(headers={"Authorization": f"Bearer {server.demo.keys['acme']}"}, timeout=60)

    async def hostile(schema: dict) -> int:
        body = schema_format(schema) | {
            "model": "acme",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 1,
        }
        response = await raw.post(f"{server.base_url}/chat/completions", json=body)
        if response.status_code != 200:
            assert response.json()["error"]["param"] == "response_format"
        return response.status_code

    alone, beside = [], []

    async def rounds() -> None:
        for salt in range(3):
            alone.append(await first_token_s())
            burst = asyncio.gather(*(hostile(s) for s in hostile_schemas(salt)))
            beside.append(await first_token_s())
            statuses = await burst  # refused, or served: never a server error
            assert statuses == [400 if i in REFUSED else 200 for i in range(20)]
        await raw.aclose()

    with no_loop_stall(server.demo):
        asyncio.run(rounds())
    alone.sort()
    beside.sort()
    assert beside[1] <= 2 * alone[1] + 0.25, (alone, beside)  # medians
