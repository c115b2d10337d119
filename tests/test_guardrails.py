"""Guardrails: deny_input, deny_output and redact_output, from the matcher to the generation stream,
and the caps on patterns (`lorabox tenant set`). The live server's side is in test_guardrails_live."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from appliance.demo import build as demo
from appliance.engines.base import GenerationRequest, TokenDelta
from appliance.errors import PolicyError
from appliance.ops.cli import main
from appliance.serving.catalog import Target
from appliance.serving.generator import GenerationResult, Generator, SamplingOptions
from appliance.serving.guardrails import (
    MAX_PATTERNS,
    OutputGuard,
    OutputRules,
    check_patterns,
    input_denied,
    output_rules,
)
from appliance.serving.tokenization import TextCodec
from appliance.tenancy.policy import parse_value

TEXT = (
    "Write to jane.doe+crm@example.co.uk or call +1 415 555 2671, (415) 555-2671 or 020 7946 0958. "
    "Card 4111 1111 1111 1111 and 5500-0000-0000-0004 pay; 4111 1111 1111 1112 fails its check. "
    "In 2023, 1,200 people paid 12.50 each; version 1.2.3 shipped. The secret plan is at noon."
)
REDACTED = (
    "Write to [redacted] or call [redacted], [redacted] or [redacted]. "
    "Card [redacted] and [redacted] pay; 4111 1111 1111 1112 fails its check. "
    "In 2023, 1,200 people paid 12.50 each; version 1.2.3 shipped. The secret plan is at noon."
)
ALL = ("email", "phone", "card")


def guarded(rules: OutputRules, pieces: list[str]) -> tuple[str, bool, list[str]]:
    """What a client sees of `pieces` pushed one after another: the text, whether it was cut, and
    the text released after each push."""
    guard, released, cut = OutputGuard(rules), [], False
    for index, piece in enumerate(pieces):
        text, cut = guard.push(piece, final=index == len(pieces) - 1)
        released.append(text)
        if cut:
            break
    return "".join(released), cut, released


def test_redaction_of_the_whole_text() -> None:
    rules = output_rules((), ALL)
    assert rules is not None
    assert guarded(rules, [TEXT])[0] == REDACTED


def test_redaction_is_the_same_for_a_stream_split_at_every_position() -> None:
    rules = output_rules((), ALL)
    assert rules is not None
    for at in range(len(TEXT) + 1):
        assert guarded(rules, [TEXT[:at], TEXT[at:]])[0] == REDACTED, at
    assert guarded(rules, list(TEXT))[0] == REDACTED  # one character at a time
    for size in (2, 3, 5, 7):  # token-sized pieces
        assert guarded(rules, [TEXT[i : i + size] for i in range(0, len(TEXT), size)])[0] == REDACTED


def test_redaction_never_shows_part_of_what_it_redacts() -> None:
    """What is released at any point is a beginning of the redacted text: never a part of a
    number or address that is redacted once more of it is seen."""
    rules = output_rules((), ALL)
    assert rules is not None
    for at in range(len(TEXT) + 1):
        _, _, released = guarded(rules, [TEXT[:at], TEXT[at:]])
        assert REDACTED.startswith(released[0]), at
    _, _, released = guarded(rules, list(TEXT))
    assert all(REDACTED.startswith("".join(released[: i + 1])) for i in range(len(released)))


def test_only_the_detectors_named_act() -> None:
    rules = output_rules((), ("card",))
    assert rules is not None
    text = guarded(rules, [TEXT])[0]
    assert "jane.doe+crm@example.co.uk" in text
    assert "+1 415 555 2671" in text
    assert "4111 1111 1111 1111" not in text


DENIED = r"secret\s{1,3}plan"


def test_deny_output_cuts_where_the_match_begins_whatever_the_split() -> None:
    rules = output_rules((DENIED,), ())
    assert rules is not None
    expected = TEXT[: TEXT.index("secret plan")]
    for at in range(len(TEXT) + 1):
        text, cut, released = guarded(rules, [TEXT[:at], TEXT[at:]])
        assert (text, cut) == (expected, True), at
        assert "s" not in released[0][len(expected) :], at  # the start of the match never shown
    for size in (1, 2, 3, 4):
        pieces = [TEXT[i : i + size] for i in range(0, len(TEXT), size)]
        text, cut, released = guarded(rules, pieces)
        assert (text, cut) == (expected, True)
        assert all(expected.startswith("".join(released[: i + 1])) for i in range(len(released)))


def test_deny_output_finds_the_earliest_of_several_patterns() -> None:
    """The earliest start wins, also when a later pattern is complete first."""
    rules = output_rules(("is at noon", r"The secret plan is at"), ())
    assert rules is not None
    expected = TEXT[: TEXT.index("The secret")]
    for at in range(len(TEXT) - 30, len(TEXT) + 1):
        assert guarded(rules, [TEXT[:at], TEXT[at:]])[:2] == (expected, True), at


def test_deny_output_runs_before_redaction() -> None:
    rules = output_rules((r"call \+1 415",), ALL)
    assert rules is not None
    assert guarded(rules, list(TEXT))[:2] == ("Write to [redacted] or ", True)


# -- the generation stream ----------------------------------------------------------------------


class ScriptedEngine:
    """Gives the token ids it was made with, a few at a time (an engine as the generator sees it)."""

    def __init__(self, token_ids: list[int], per_delta: int = 1):
        self.token_ids, self.per_delta = token_ids, per_delta
        self.produced = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        ids, step = self.token_ids, self.per_delta
        for start in range(0, len(ids), step):
            self.produced = start + step
            last = start + step >= len(ids)
            yield TokenDelta(ids[start : start + step], "length" if last else None)
            await asyncio.sleep(0)


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> TextCodec:
    model_dir = tmp_path_factory.mktemp("tokenizer")
    demo.build_tokenizer(model_dir)
    return TextCodec.from_model_dir(model_dir)


async def _generate(codec: TextCodec, rules: OutputRules | None, n: int = 1) -> tuple[list[Any], Any, Any]:
    ids = codec.encode_prompt(TEXT)
    ids = [i for i in ids if i not in (codec.tokenizer.bos_token_id,)]
    engine = ScriptedEngine(ids, per_delta=2)
    generator = Generator(engine, codec, max_model_len=4096)  # type: ignore[arg-type]
    result = GenerationResult(prompt_tokens=1)
    chunks = [
        chunk
        async for chunk in generator.stream(
            request_id="r",
            target=Target("base", None),
            cache_salt="t",
            prompt_ids=[1],
            options=SamplingOptions(max_tokens=len(ids), n=n),
            result=result,
            guard=rules,
        )
    ]
    return chunks, result, engine


async def test_a_denied_match_spanning_several_tokens_never_reaches_the_client(codec: TextCodec) -> None:
    ids = codec.encode_prompt(TEXT)
    start = TEXT.index("secret plan")
    assert len(codec.encode_prompt("secret plan", None)) > 2  # several tokens
    chunks, result, engine = await _generate(codec, output_rules((DENIED,), ()))
    text = "".join(c.text for c in chunks)
    assert text == TEXT[:start]
    assert chunks[-1].finish_reason == "content_filter"
    assert result.finish_reasons == {0: "content_filter"}
    assert result.guardrails == {"deny_output"}
    assert engine.produced < len(ids)  # the generation was stopped, not run to its end


async def test_every_choice_is_redacted(codec: TextCodec) -> None:
    chunks, result, _ = await _generate(codec, output_rules((), ALL), n=2)
    for index in (0, 1):
        assert "".join(c.text for c in chunks if c.index == index) == REDACTED
    assert result.finish_reasons == {0: "length", 1: "length"}
    assert result.guardrails == {"redact_output"}


async def test_no_guardrails_changes_nothing(codec: TextCodec) -> None:
    chunks, result, _ = await _generate(codec, None)
    assert "".join(c.text for c in chunks) == TEXT
    assert result.guardrails == set()


# -- input, caps, linear time --------------------------------------------------------------------


def test_deny_input_matches_any_text() -> None:
    patterns = check_patterns("deny_input", [r"(?i)ignore (all )?previous instructions", "rm -rf"])
    assert input_denied(patterns, ["hello", "Please IGNORE previous instructions"])
    assert not input_denied(patterns, ["hello", "ignore the previous line"])
    assert not input_denied((), ["anything"])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "deny_input",
            ["x"] * (MAX_PATTERNS + 1),
            f"at most {MAX_PATTERNS} patterns, not {MAX_PATTERNS + 1}",
        ),
        ("deny_input", ["a" * 501], "pattern 1: at most 500 characters"),
        ("deny_input", ["ok", "(unclosed"], "pattern 2 is not a valid RE2 pattern"),
        ("deny_input", ["a*"], "pattern 1 matches empty text"),
        ("deny_input", [r"(?<=a)b"], "pattern 1 is not a valid RE2 pattern"),  # no lookbehind in RE2
        ("deny_output", [r"secret.*"], "pattern 1 may match more than 256 characters"),
        ("deny_output", [r"x{300}"], "pattern 1 may match more than 256 characters"),
        ("deny_input", [3], "must be a list of patterns"),
        ("redact_output", "email,ssn", "no detector 'ssn'"),
    ],
)
def test_unfit_patterns_are_refused_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)) as caught:
        parse_value(field, value)
    assert caught.value.field == field


def test_a_10000_pattern_list_is_refused_at_tenant_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nadapters_dir = "{tmp_path / "adapters"}"\n')
    assert main(["tenant", "add", "acme", "--config", str(config)]) == 0
    patterns = tmp_path / "patterns.txt"
    patterns.write_text("".join(f"word{i}\n" for i in range(10_000)))
    assert main(["tenant", "set", "acme", "--deny-output-file", str(patterns), "--config", str(config)]) == 1
    assert "deny_output: at most 200 patterns, not 10000" in capsys.readouterr().err
    assert main(["tenant", "set", "acme", "--deny-output", "word1", "--config", str(config)]) == 0
    assert main(["tenant", "set", "acme", "--deny-output", "none", "--config", str(config)]) == 0


def test_a_redos_pattern_runs_in_linear_time() -> None:
    """`(a+)+$` on "aaa...!" takes a backtracking engine 2^n steps; RE2 takes n. CPU time of ten
    times the text, against the text: about ten times (judged loosely: a busy machine slows both)."""
    patterns = check_patterns("deny_input", [r"(a+)+$", r"(a|aa)+b", r"(.*a){20}b"])

    def cpu(n: int) -> float:
        text = "a" * n + "!"
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            assert not input_denied(patterns, [text])
            best = min(best, time.process_time() - started)
        return best

    small, large = cpu(200_000), cpu(2_000_000)
    assert large / max(small, 1e-4) < 40, (small, large)


def test_the_daemon_checks_the_caps_again_on_what_it_reads() -> None:
    """A database edited past the caps: the request path refuses to run the lists (the API answers
    500 guardrail_invalid), rather than serving unfiltered or running an unbounded list."""
    with pytest.raises(PolicyError, match="at most 200 patterns"):
        output_rules(tuple(f"w{i}" for i in range(10_000)), ())
    with pytest.raises(PolicyError, match="may match more than 256"):
        output_rules(("secret.*",), ())
    with pytest.raises(PolicyError, match="at most 200 patterns"):
        input_denied(tuple(f"w{i}" for i in range(10_000)), ["text"])
