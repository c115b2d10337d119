"""Every tenant is answered by its own adapter: outputs equal HF transformers + PEFT, token for token."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from openai import AsyncOpenAI, OpenAI

from appliance.demo.build import DEMO_TENANTS

TENANTS = [t.name for t in DEMO_TENANTS]
MAX_TOKENS = 16
PROMPTS = [
    "Hello, how can I help",
    "The quick brown fox",
    "Support tickets and invoices",
    "tenant adapter box",
]
CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You write product descriptions."},
        {"role": "user", "content": "A lamp."},
    ],
]


def client(server, tenant: str) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key=server.demo.keys[tenant], max_retries=0)


def test_fixture_has_clear_greedy_margins(reference):
    """The demo model is trained so that greedy choices are never near-ties (engines would flip)."""
    prompts = [reference.prompt_ids(p) for p in PROMPTS] + [reference.chat_ids(c) for c in CHATS]
    margins = [
        reference.generate_with_margin(tenant, ids, MAX_TOKENS)[1]
        for tenant in [None, *TENANTS]
        for ids in prompts
    ]
    assert min(margins) > 0.5, sorted(margins)[:5]


def test_tenants_produce_different_outputs(reference):
    """Otherwise the parity tests could not tell one adapter from another."""
    ids = reference.prompt_ids(PROMPTS[0])
    outputs = {tenant: tuple(reference.generate(tenant, ids, MAX_TOKENS)) for tenant in [None, *TENANTS]}
    assert len(set(outputs.values())) == len(outputs), outputs


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_matches_peft_reference(server, reference, tenant, prompt):
    response = client(server, tenant).completions.create(
        model=tenant, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    expected = reference.generate(tenant, reference.prompt_ids(prompt), MAX_TOKENS)
    assert response.choices[0].text == reference.text(expected)
    assert response.usage.completion_tokens == len(expected)
    assert response.usage.prompt_tokens == len(reference.prompt_ids(prompt))


@pytest.mark.parametrize("tenant", TENANTS)
@pytest.mark.parametrize("messages", CHATS, ids=["user", "system+user"])
def test_chat_matches_peft_reference(server, reference, tenant, messages):
    response = client(server, tenant).chat.completions.create(
        model=f"{tenant}@v1", messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    expected = reference.generate(tenant, reference.chat_ids(messages), MAX_TOKENS)
    assert response.choices[0].message.content == reference.text(expected)
    assert response.usage.completion_tokens == len(expected)


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_base_model_matches_plain_transformers(server, reference, base_model_name, prompt):
    response = client(server, "acme").completions.create(
        model=base_model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
    )
    expected = reference.generate(None, reference.prompt_ids(prompt), MAX_TOKENS)
    assert response.choices[0].text == reference.text(expected)


async def test_interleaved_tenants_never_mix(server, reference, base_model_name):
    """36 requests from every tenant (and the base model) in flight at once, in mixed batches."""
    jobs = list(itertools.islice(itertools.cycle(itertools.product([*TENANTS, None], PROMPTS)), 36))
    clients = {
        t: AsyncOpenAI(base_url=server.base_url, api_key=server.demo.keys[t], max_retries=0) for t in TENANTS
    }

    async def one(index: int, tenant: str | None, prompt: str) -> tuple[str | None, str, str]:
        caller = tenant or TENANTS[index % len(TENANTS)]
        response = await clients[caller].completions.create(
            model=tenant or base_model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return tenant, prompt, response.choices[0].text

    results = await asyncio.gather(*(one(i, t, p) for i, (t, p) in enumerate(jobs)))
    mismatches = [
        (tenant, prompt)
        for tenant, prompt, text in results
        if text != reference.text(reference.generate(tenant, reference.prompt_ids(prompt), MAX_TOKENS))
    ]
    assert not mismatches
    assert len(results) == 36
