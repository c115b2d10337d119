"""Sampling parameters on both engines, against Hugging Face transformers + PEFT (fp32): logprobs,
penalties, logit_bias, n with a seed, min_tokens and ignore_eos."""

from __future__ import annotations

import math

import pytest
import torch
from openai import OpenAI

from tests.conftest import Server

TENANTS = ["acme", "globex", "initech"]
GREETING = [{"role": "user", "content": "Hello!"}]
PROMPT = "The quick brown fox"
TOLERANCE = 1e-4


@pytest.fixture(params=["vllm", "llamacpp"])
def live(request: pytest.FixtureRequest) -> Server:
    """Each test runs on both engines' shared daemons."""
    return request.getfixturevalue("server" if request.param == "vllm" else "llamacpp_server")


def client(live: Server, tenant: str = "acme") -> OpenAI:
    return OpenAI(base_url=live.base_url, api_key=live.demo.keys[tenant], max_retries=0)


def token_ids(reference, texts: list[str]) -> list[int]:
    ids = []
    for text in texts:
        found = reference.tokenizer.convert_tokens_to_ids(reference.tokenizer.tokenize(text))
        assert len(found) == 1, (text, found)  # every demo token's text maps back to itself
        ids += found
    return ids


@pytest.mark.parametrize("tenant", [None, *TENANTS])
def test_chat_logprobs_equal_the_reference(live, reference, base_model_name, tenant) -> None:
    """The logprob of each greedy token and of its top 5 alternatives, as HF's log-softmax."""
    response = client(live, tenant or "acme").chat.completions.create(
        model=tenant or base_model_name,
        messages=GREETING,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    entries = response.choices[0].logprobs.content
    prompt = reference.chat_ids(GREETING)
    expected = reference.generate(tenant, prompt, 12)
    assert (
        "".join(e.token for e in entries) == response.choices[0].message.content == reference.text(expected)
    )
    assert bytes(b for e in entries for b in e.bytes) == response.choices[0].message.content.encode()
    rows = reference.log_softmax(tenant, prompt, expected[: len(entries)])
    for row, entry, token in zip(rows, entries, expected, strict=False):
        assert abs(entry.logprob - float(row[token])) < TOLERANCE
        best = torch.topk(row, 5)
        assert [t.token for t in entry.top_logprobs] == [
            reference.tokenizer.decode([i]) for i in best.indices
        ]
        for alternative, value in zip(entry.top_logprobs, best.values, strict=True):
            assert abs(alternative.logprob - float(value)) < TOLERANCE


def test_completion_logprobs_equal_the_reference_streamed_too(live, reference) -> None:
    kwargs = {"model": "globex", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 3}
    whole = client(live, "globex").completions.create(**kwargs).choices[0]
    chunks = [
        c.choices[0] for c in client(live, "globex").completions.create(stream=True, **kwargs) if c.choices
    ]
    prompt = reference.prompt_ids(PROMPT)
    expected = reference.generate("globex", prompt, 10)
    rows = reference.log_softmax("globex", prompt, expected)
    assert whole.logprobs.tokens == [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert whole.logprobs.text_offset == [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert "".join(whole.logprobs.tokens) == whole.text
    for row, token, logprob, top in zip(
        rows, expected, whole.logprobs.token_logprobs, whole.logprobs.top_logprobs, strict=True
    ):
        assert abs(logprob - float(row[token])) < TOLERANCE
        best = torch.topk(row, 3)
        assert list(top) == [reference.tokenizer.decode([i]) for i in best.indices]


# The demo model's answers win by wide margins; past the end of an answer (ignore_eos) it is less
# sure of itself, and there penalties of these sizes change what it writes, by clear margins.
QUESTION = [{"role": "user", "content": "What can you do?"}]
PAST_THE_END = 48


def test_repetition_penalty_equals_hf_generate(live, reference) -> None:
    prompt = reference.chat_ids(QUESTION)
    expected, margin = reference.generate_with_margin(
        "initech", prompt, PAST_THE_END, eos_token_id=None, repetition_penalty=1.3
    )
    assert expected != reference.generate("initech", prompt, PAST_THE_END, eos_token_id=None)  # it bites
    assert margin > 0.1
    response = client(live, "initech").chat.completions.create(
        model="initech",
        messages=QUESTION,
        max_tokens=PAST_THE_END,
        temperature=0,
        extra_body={"repetition_penalty": 1.3, "ignore_eos": True},
    )
    assert response.choices[0].message.content == reference.text(expected)


def openai_penalised(
    reference, adapter, prompt: list[int], n: int, presence: float, frequency: float
) -> list[int]:
    """Greedy decoding (past the end of sequence) with OpenAI's documented formula applied to HF's
    logits: logit[j] -= frequency * count[j] + presence * (count[j] > 0), counts over the output."""
    out: list[int] = []
    for _ in range(n):
        logits = reference.next_logits(adapter, prompt + out)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        best = torch.topk(logits, 2).values
        assert best[0] - best[1] > 0.1  # a clear choice: engines agree with HF on it
        out.append(int(torch.argmax(logits)))
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.2), (0.8, 0.8)])
def test_presence_and_frequency_penalties_follow_openais_formula(
    live, reference, presence, frequency
) -> None:
    prompt = reference.chat_ids(QUESTION)
    expected = openai_penalised(reference, "acme", prompt, PAST_THE_END, presence, frequency)
    assert expected != reference.generate("acme", prompt, PAST_THE_END, eos_token_id=None)  # they bite
    response = client(live).chat.completions.create(
        model="acme",
        messages=QUESTION,
        max_tokens=PAST_THE_END,
        temperature=0,
        presence_penalty=presence,
        frequency_penalty=frequency,
        extra_body={"ignore_eos": True},
    )
    assert response.choices[0].message.content == reference.text(expected)


def test_logit_bias_moves_the_greedy_token(live, reference) -> None:
    prompt = reference.prompt_ids(PROMPT)
    greedy = reference.generate("acme", prompt, 1)[0]
    other = token_ids(reference, [" lamp"])[0]

    def first(bias: dict[str, int]) -> str:
        response = client(live).completions.create(
            model="acme", prompt=PROMPT, max_tokens=1, temperature=0, logit_bias=bias
        )
        return response.choices[0].text

    assert first({}) == reference.text([greedy])
    assert first({str(greedy): -100}) != reference.text([greedy])
    assert first({str(other): 100}) == " lamp"


def test_n_choices_with_a_seed_are_reproducible(live, base_model_name) -> None:
    """Where the base model is unsure (several tokens likely at temperature 2), seeded choices."""

    def sample() -> tuple[list[str], int]:
        response = client(live).completions.create(
            model=base_model_name,
            prompt="1 2 3",
            max_tokens=8,
            temperature=2.0,
            n=3,
            seed=1234,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in response.choices] == [0, 1, 2]
        return [c.text for c in response.choices], response.usage.completion_tokens

    texts, completion_tokens = sample()
    assert len(set(texts)) > 1  # three draws, not one repeated
    assert sample() == (texts, completion_tokens)
    assert completion_tokens == 3 * 8  # usage counts every choice


def test_streamed_n_choices_each_end_and_usage_counts_them(live) -> None:
    stream = client(live).chat.completions.create(
        model="acme", messages=GREETING, max_tokens=6, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    texts, finished, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts[0] == texts[1]
    assert texts[0]
    assert finished == {0: "length", 1: "length"}
    assert usage is not None
    assert usage.completion_tokens == 12


def test_min_tokens_and_ignore_eos(live, reference) -> None:
    natural = reference.generate("acme", reference.chat_ids(GREETING), 64)
    assert len(natural) < 30  # the greeting ends well before 30 tokens
    longer = client(live).chat.completions.create(
        model="acme", messages=GREETING, max_tokens=40, temperature=0, extra_body={"min_tokens": 30}
    )
    assert longer.usage.completion_tokens >= 30
    assert longer.choices[0].message.content.startswith(reference.text(natural))
    endless = client(live).chat.completions.create(
        model="acme", messages=GREETING, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    assert (endless.usage.completion_tokens, endless.choices[0].finish_reason) == (40, "length")


def test_logprobs_are_finite_numbers(live) -> None:
    response = client(live).chat.completions.create(
        model="acme", messages=GREETING, max_tokens=4, temperature=0, logprobs=True, top_logprobs=20
    )
    for entry in response.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 20
        assert all(math.isfinite(t.logprob) for t in entry.top_logprobs)
