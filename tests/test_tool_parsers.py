"""Each tool-call family on recorded model outputs: text with and without calls, several calls,
broken JSON (text, never an error), and the same answer however the text is split into pieces."""

from __future__ import annotations

import json

import pytest

from appliance.serving.tools import FORMATS, ToolCalling, select
from appliance.serving.tools.base import Tool
from appliance.serving.tools.reader import ToolCallReader

NAMES = {"track_parcel", "get_weather"}

# (format, recorded output, expected content, expected calls as (name, arguments object))
RECORDED = [
    # hermes: Qwen2.5 / Hermes style
    ("hermes", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    (
        "hermes",
        '<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": "48213"}}\n</tool_call>',
        "",
        [("track_parcel", {"order_id": "48213"})],
    ),
    (
        "hermes",
        'Let me check both.\n<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": "1"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n'
        "</tool_call>",
        "Let me check both.\n",
        [("track_parcel", {"order_id": "1"}), ("get_weather", {"city": "Paris", "days": [1, 2]})],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "a \\"quoted\\" } brace"}}\n</tool_call>',
        "",
        [("get_weather", {"city": 'a "quoted" } brace'})],
    ),
    (  # broken JSON: the text it was
        "hermes",
        '<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": }\n</tool_call> sorry',
        '<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": }\n</tool_call> sorry',
        [],
    ),
    (  # a function that was not offered: text
        "hermes",
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
        [],
    ),
    (  # cut off by max_tokens: text
        "hermes",
        '<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": "4',
        '<tool_call>\n{"name": "track_parcel", "arguments": {"order_id": "4',
        [],
    ),
    ("hermes", "Use <b>bold</b> and a < sign.", "Use <b>bold</b> and a < sign.", []),
    # Llama 3.1 / 3.2 JSON
    ("llama3_json", "It is sunny in Paris.", "It is sunny in Paris.", []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", {"city": "Paris"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "track_parcel", "parameters": {"order_id": "7"}}; '
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "",
        [("track_parcel", {"order_id": "7"}), ("get_weather", {"city": "Oslo"})],
    ),
    ("llama3_json", 'The JSON is {"a": 1}.', 'The JSON is {"a": 1}.', []),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Pa',
        '{"name": "get_weather", "parameters": {"city": "Pa',
        [],
    ),
    # Mistral: v3/v7 JSON array, v11 name[ARGS]
    ("mistral", "Sunny.", "Sunny.", []),
    (
        "mistral",
        'Checking.[TOOL_CALLS][{"name": "track_parcel", "arguments": {"order_id": "9"}}, '
        '{"name": "get_weather", "arguments": {"city": "Rome"}}]',
        "Checking.",
        [("track_parcel", {"order_id": "9"}), ("get_weather", {"city": "Rome"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Lyon"}[TOOL_CALLS]track_parcel[ARGS]{"order_id": "3"}',
        "",
        [("get_weather", {"city": "Lyon"}), ("track_parcel", {"order_id": "3"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ]',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": ]',
        [],
    ),
]


def read(name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str, tuple[str, ...]]]]:
    reader = ToolCallReader(FORMATS[name], NAMES)
    text, calls = "", []
    for i, piece in enumerate(pieces):
        out = reader.push(piece, final=i == len(pieces) - 1)
        text += out.text
        calls += [(c.name, c.arguments, c.fragments) for c in out.calls]
    return text, calls


@pytest.mark.parametrize(("name", "output", "content", "expected"), RECORDED)
@pytest.mark.parametrize("piece", [1, 3, 10_000], ids=["by-char", "by-3", "whole"])
def test_recorded_outputs(name, output, content, expected, piece) -> None:
    text, calls = read(name, [output[i : i + piece] for i in range(0, len(output), piece)])
    assert text == content
    assert [(n, json.loads(arguments)) for n, arguments, _ in calls] == expected
    for _, arguments, fragments in calls:
        assert "".join(fragments) == arguments  # the fragments join to the final arguments
        assert len(fragments) == (1 if piece == 10_000 else len(fragments))


def test_arguments_come_in_the_pieces_the_model_wrote() -> None:
    _, calls = read(
        "hermes",
        ['<tool_call>\n{"name": "get_weather", "arguments": {"ci', 'ty": "Pa', 'ris"}}\n</tool_call>'],
    )
    assert calls[0][2] == ('{"ci', 'ty": "Pa', 'ris"}')


def test_text_that_could_start_a_marker_is_held_back_until_it_cannot() -> None:
    reader = ToolCallReader(FORMATS["hermes"], NAMES)
    assert reader.push("Hello <tool").text == "Hello "
    assert reader.push("box> done").text == "<toolbox> done"


def test_text_after_the_calls_is_content_again() -> None:
    text, calls = read(
        "hermes", ['<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>\n\nDone.']
    )
    assert (text, [c[0] for c in calls]) == ("Done.", ["get_weather"])


def test_long_call_text_is_scanned_once() -> None:
    """Streaming a long call one character at a time stays linear (the JSON scanner resumes)."""
    arguments = json.dumps({"city": "x" * 20_000})
    output = f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}\n</tool_call>'
    _, calls = read("hermes", list(output))
    assert calls[0][1] == arguments


def test_the_family_comes_from_the_chat_template() -> None:
    qwen = "{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>\n{{ name }}</tool_call>"
    llama = "{% if tools %}Given the following functions, please respond with a JSON for a function call"
    mistral = "{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]"
    assert select("auto", qwen)[0] is FORMATS["hermes"]
    assert select("auto", llama)[0] is FORMATS["llama3_json"]
    assert select("auto", mistral)[0] is FORMATS["mistral"]
    assert select("mistral", qwen)[0] is FORMATS["mistral"]  # the config wins
    assert select("auto", "{{ messages }}")[0] is None  # renders no tools
    assert select("none", qwen)[0] is None


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_family_grammar_admits_its_own_calls(name: str) -> None:
    """A call written in the family's format parses back; the grammar accepts exactly that text."""
    import llguidance
    import llguidance.hf
    from transformers import AutoTokenizer

    from appliance.demo.build import DEMO_DATA_DIR
    from appliance.serving.tools import literal_for

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DATA_DIR / "model")
    tools = (
        Tool("track_parcel", {"type": "object", "properties": {"order_id": {"type": "string"}}}),
        Tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}}),
    )
    grammar = ToolCalling(tools, "required").grammar(FORMATS[name], literal_for(tokenizer), None)
    assert grammar is not None
    written = {
        "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
        "llama3_json": '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
        "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
    }[name]
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar.serialized())
    ids = tokenizer(written, add_special_tokens=False).input_ids
    assert matcher.try_consume_tokens(ids) == len(ids), matcher.get_error()
    assert matcher.is_accepting()
    text, calls = read(name, [written])
    assert (text, [(n, json.loads(a)) for n, a, _ in calls]) == ("", [("get_weather", {"city": "Oslo"})])


def test_a_family_marker_that_is_a_special_token_survives_detokenization() -> None:
    """Mistral's [TOOL_CALLS] is a special token: kept in the text the reader sees (and written
    as that token by the grammar), while other special tokens are still dropped."""
    from transformers import AutoTokenizer

    from appliance.demo.build import DEMO_DATA_DIR
    from appliance.serving.tokenization import TextCodec
    from appliance.serving.tools import kept_tokens, literal_for

    tokenizer = AutoTokenizer.from_pretrained(DEMO_DATA_DIR / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    marker = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    keep = kept_tokens(FORMATS["mistral"], tokenizer)
    assert keep == {marker}
    assert literal_for(tokenizer)("[TOOL_CALLS]") == f"<[{marker}]>"
    call = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    ids = [*tokenizer("Sure.", add_special_tokens=False).input_ids, marker]
    ids += [*tokenizer(call, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    codec = TextCodec(tokenizer)
    assert codec.decode(ids) == "Sure." + call  # without keep: the marker is gone, as any special token
    detokenizer = codec.detokenizer(keep)
    text = "".join(detokenizer.feed([token]) for token in ids) + detokenizer.finish()
    assert text == "Sure.[TOOL_CALLS]" + call
    assert read("mistral", [text])[0] == "Sure."
