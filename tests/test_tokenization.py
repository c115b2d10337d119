"""Incremental detokenizing, stop strings and chat prompts with the demo tokenizer."""

from __future__ import annotations

import random
from typing import Any

import pytest

from appliance.demo import build as demo
from appliance.serving.tokenization import (
    REPLACEMENT_CHAR,
    PromptEncoder,
    PromptError,
    StopMatcher,
    TextCodec,
)

TEXTS = [
    "héllo ✓ 漢字 🎉",
    "Hello, how can I help you today?",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — Ünïcödé ½ ∑ 𝔘𝔫𝔦",
    "👩\u200d👩\u200d👧 family, 🇫🇷 flag, e\u0301 combining",
    "  leading and trailing spaces  ",
    "line one\nline two\ttabbed",
    "",
]


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> TextCodec:
    model_dir = tmp_path_factory.mktemp("tokenizer")
    demo.build_tokenizer(model_dir)
    return TextCodec.from_model_dir(model_dir)


@pytest.fixture(scope="module")
def byte_ids(codec: TextCodec) -> list[int]:
    """Ids of the 256 single-byte tokens of the byte-level BPE."""
    ids = [i for token, i in codec.tokenizer.get_vocab().items() if len(token) == 1]
    assert len(ids) == 256
    return sorted(ids)


@pytest.fixture(scope="module")
def special_ids(codec: TextCodec) -> list[int]:
    return [codec.tokenizer.convert_tokens_to_ids(t) for t in demo.SPECIAL_TOKENS]


def seeded(seed: int) -> random.Random:
    # Reproducible test data, not secrets.
    return random.Random(seed)  # noqa: S311


def stream(codec: TextCodec, ids: list[int], chunks: list[int]) -> tuple[list[str], str]:
    """Feed ids in chunks of the given sizes; returns (deltas from feed, delta from finish)."""
    detok = codec.detokenizer()
    deltas, at = [], 0
    for size in chunks:
        deltas.append(detok.feed(ids[at : at + size]))
        at += size
    assert at == len(ids)
    return deltas, detok.finish()


def random_chunks(rng: random.Random, total: int) -> list[int]:
    chunks = []
    while total:
        size = min(total, rng.randint(1, 5))
        chunks.append(size)
        total -= size
    return chunks


def check_stream(codec: TextCodec, ids: list[int], chunks: list[int]) -> list[str]:
    deltas, rest = stream(codec, ids, chunks)
    full = codec.decode(ids)
    assert "".join(deltas) + rest == full
    for delta in deltas:
        assert not delta.endswith(REPLACEMENT_CHAR), (ids, deltas)
    if not full.endswith(REPLACEMENT_CHAR):
        assert not rest.endswith(REPLACEMENT_CHAR)
    return deltas


# -- the codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(codec: TextCodec, text: str) -> None:
    assert codec.decode(codec.encode_prompt(text)) == text


def test_eos_token_ids(codec: TextCodec) -> None:
    assert codec.eos_token_ids == (codec.tokenizer.convert_tokens_to_ids(demo.EOS),)


def test_multibyte_text_uses_single_byte_tokens(codec: TextCodec, byte_ids: list[int]) -> None:
    """Guards the tests below: they are only meaningful if characters span several tokens."""
    ids = codec.encode_prompt("漢字 🎉")
    assert sum(i in byte_ids for i in ids) >= 6
    assert REPLACEMENT_CHAR in codec.decode(ids[:1])


# -- Detokenizer --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_one_token_at_a_time(codec: TextCodec, text: str) -> None:
    ids = codec.encode_prompt(text)
    deltas, rest = stream(codec, ids, [1] * len(ids))
    assert "".join(deltas) == text
    # Complete text is never held back until finish().
    assert rest == ""


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("text", TEXTS[:5])
def test_detokenizer_random_chunks(codec: TextCodec, text: str, seed: int) -> None:
    ids = codec.encode_prompt(text)
    rng = seeded(seed)
    check_stream(codec, ids, random_chunks(rng, len(ids)))


def test_detokenizer_releases_ascii_immediately(codec: TextCodec) -> None:
    ids = codec.encode_prompt("Hello, how can I help you today?")
    detok = codec.detokenizer()
    for token_id in ids:
        assert detok.feed([token_id]) == codec.decode([token_id])


def test_detokenizer_holds_an_incomplete_character(codec: TextCodec) -> None:
    ids = codec.encode_prompt("a🎉b")
    detok = codec.detokenizer()
    out = [detok.feed([i]) for i in ids]
    assert out[0] == "a"
    # The emoji's four bytes arrive one by one: nothing until the last one.
    assert "🎉" in "".join(out)
    assert "" in out[1:-1]  # something was held back
    assert all(REPLACEMENT_CHAR not in d for d in out)
    assert "".join(out) + detok.finish() == "a🎉b"


def test_detokenizer_skips_special_tokens(codec: TextCodec, special_ids: list[int]) -> None:
    bos, eos = special_ids[0], special_ids[1]
    ids = [bos, *codec.encode_prompt("Hi ✓"), eos]
    deltas = check_stream(codec, ids, [1] * len(ids))
    assert "".join(deltas) == "Hi ✓"


def test_detokenizer_random_byte_sequences(
    codec: TextCodec, byte_ids: list[int], special_ids: list[int]
) -> None:
    """Random bytes (valid and invalid UTF-8) mixed with word pieces and special tokens."""
    rng = seeded(1234)
    vocab = codec.tokenizer.get_vocab()
    pieces = [i for token, i in vocab.items() if len(token) > 1 and i not in special_ids]
    utf8_ids = {text: codec.encode_prompt(text) for text in TEXTS[:5]}
    for _ in range(300):
        ids: list[int] = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.5:
                ids.append(rng.choice(byte_ids))
            elif roll < 0.7:
                ids.append(rng.choice(pieces))
            elif roll < 0.8:
                ids.append(rng.choice(special_ids))
            else:
                ids.extend(rng.choice(list(utf8_ids.values())))
        check_stream(codec, ids, [1] * len(ids))
        check_stream(codec, ids, random_chunks(rng, len(ids)))


def test_detokenizer_truncated_character_is_released_at_finish(codec: TextCodec) -> None:
    ids = codec.encode_prompt("ok 漢")[:-1]  # the last byte of 漢 never comes
    full = codec.decode(ids)
    assert full.endswith(REPLACEMENT_CHAR)
    deltas, rest = stream(codec, ids, [1] * len(ids))
    assert "".join(deltas) == "ok "
    assert "".join(deltas) + rest == full


# -- StopMatcher --------------------------------------------------------------------------------


def run_stops(stops: tuple[str, ...], chunks: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    sent, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        sent.append(text)
        if stopped:
            break
    if not stopped:
        sent.append(matcher.flush())
    return "".join(sent), stopped, sent


def test_stop_inside_one_chunk() -> None:
    assert StopMatcher(("END",)).push("hello END world") == ("hello ", True)


def test_stop_split_across_chunks() -> None:
    matcher = StopMatcher(("END",))
    assert matcher.push("hello E") == ("hello ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("D and more") == ("", True)


def test_partial_stop_is_held_then_released() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.push("abc ST") == ("abc ", False)
    assert matcher.push("ar") == ("STar", False)
    assert matcher.push(" S") == (" ", False)
    assert matcher.flush() == "S"
    assert matcher.flush() == ""


def test_stop_at_the_very_start() -> None:
    assert StopMatcher(("\n",)).push("\nrest") == ("", True)


def test_earliest_of_several_stops_wins() -> None:
    for stops in [("world", "lo"), ("lo", "world")]:
        assert StopMatcher(stops).push("hello world") == ("hel", True)
    assert run_stops(("xyz", "wor"), ["hello w", "orld xyz"])[:2] == ("hello ", True)


def test_no_stops_is_passthrough() -> None:
    matcher = StopMatcher(())
    for chunk in ["partial ST", "OP", "", "\ufffd"]:
        assert matcher.push(chunk) == (chunk, False)
    assert matcher.flush() == ""


def reference_cut(stops: tuple[str, ...], text: str) -> tuple[str, bool]:
    """Where checking after every character would cut: the first end of a stop string (the longest
    of those ending there)."""
    for end in range(1, len(text) + 1):
        ending = [len(s) for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(ending)], True
    return text, False


def reference_hold(stops: tuple[str, ...], text: str) -> int:
    """How much of the text's end could still become a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def random_stops(rng: random.Random) -> tuple[str, ...]:
    # A small alphabet makes overlaps, repeats and stops inside other stops common.
    return tuple(
        "".join(rng.choice("aab ") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))
    )


def test_stops_match_a_reference_whatever_the_chunking() -> None:
    """After every push, exactly what no stop string can still start in has been released; the
    cut is where checking after every character would cut, however the text is chunked."""
    rng = seeded(99)
    for _ in range(3000):
        stops = random_stops(rng)
        text = "".join(rng.choice("aab c") for _ in range(rng.randint(0, 30)))
        expected = reference_cut(stops, text)
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        matcher, released, pushed, stopped = StopMatcher(stops), "", "", False
        for chunk in chunks:
            out, stopped = matcher.push(chunk)
            released, pushed = released + out, pushed + chunk
            if stopped:
                break
            assert reference_cut(stops, pushed) == (pushed, False), (stops, chunks)
            assert released == pushed[: len(pushed) - reference_hold(stops, pushed)], (stops, chunks)
        if not stopped:
            released += matcher.flush()
        assert (released, stopped) == expected, (stops, chunks)


def test_long_stop_string_one_character_at_a_time() -> None:
    """The worst case for a naive hold-back: a long stop string whose prefix keeps almost matching."""
    stop = "a" * 1023 + "b"
    text = "a" * 3000 + "b tail"
    released, stopped, _ = run_stops((stop,), list(text))
    assert (released, stopped) == ("a" * (3000 - 1023), True)
    released, stopped, _ = run_stops((stop, "ab"), list(text))
    assert (released, stopped) == ("a" * (3000 - 1023), True)  # both end at the "b": the longer wins


# -- prompts: limits and off the event loop -----------------------------------------------------


def test_encoding_stops_at_the_limit(codec: TextCodec) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 40
    messages = [{"role": "user", "content": text}]
    full_prompt, full_chat = codec.encode_prompt(text), codec.encode_chat(messages)
    assert codec.encode_prompt(text, limit=7) == full_prompt[:7]
    assert codec.encode_chat(messages, limit=7) == full_chat[:7]
    assert codec.encode_prompt(text, limit=10_000) == full_prompt
    assert codec.encode_chat(messages, limit=10_000) == full_chat


async def test_prompt_encoder_gives_the_codecs_ids_small_or_large(codec: TextCodec) -> None:
    encoder = PromptEncoder(codec, threads=1)
    for text in ("short ✓", "long ✓ " * 2000):  # in place, and on the pool
        messages = [{"role": "user", "content": text}]
        assert await encoder.prompt(text, 100_000) == codec.encode_prompt(text)
        assert await encoder.chat(messages, 100_000) == codec.encode_chat(messages)
        assert await encoder.chat(messages, 5) == codec.encode_chat(messages)[:5]


# -- chat template ------------------------------------------------------------------------------


def test_encode_chat_renders_the_template(codec: TextCodec) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi ✓"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    ids = codec.encode_chat(messages)
    tokens = codec.tokenizer
    header = tokens("<|start_header|>assistant<|end_header|>", add_special_tokens=False).input_ids
    assert ids[0] == tokens.bos_token_id
    assert ids.count(tokens.bos_token_id) == 1
    assert ids[-len(header) :] == header
    assert ids.count(tokens.convert_tokens_to_ids("<|eot|>")) == len(messages)
    assert codec.decode(ids) == "systemBe brief.userHi ✓assistantHello.userByeassistant"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"content": "no role"}],
        ["not a dict"],
    ],
    ids=["no-content", "none-content", "no-role", "not-a-dict"],
)
def test_encode_chat_unrenderable_messages_raise_prompt_error(codec: TextCodec, messages: list[Any]) -> None:
    with pytest.raises(PromptError, match="chat template"):
        codec.encode_chat(messages)


def test_encode_chat_unknown_role_is_rendered_or_refused(codec: TextCodec) -> None:
    """The demo template does not police roles (the API does, before this): either outcome is fine,
    but nothing other than PromptError may escape."""
    try:
        ids = codec.encode_chat([{"role": "wizard", "content": "hi"}])
    except PromptError:
        return
    assert ids[0] == codec.tokenizer.bos_token_id
    assert codec.decode(ids) == "wizardhiassistant"
