"""Guardrails on the live server, through the official `openai` client: a denied input is refused
naming no pattern, a denied output never reaches the client (streamed or not, the match spanning
several tokens), the ledger and /metrics count them. Each test makes its own tenants on the shared
session server."""

from __future__ import annotations

import sqlite3
import urllib.request
import uuid
from typing import Any

import openai
import pytest
import re2
from openai import OpenAI

from appliance.api.adminclient import AdminClient
from appliance.tenancy.store import Store
from tests.conftest import Server

MODEL = "lorabox-demo"
PROMPT = "Tell me about your products."


def tenant(server: Server, **policy: Any) -> tuple[str, OpenAI]:
    name = f"guard-{uuid.uuid4().hex[:10]}"
    with Store.open(server.demo.database) as store:
        store.add_tenant(name, allow_base_model=True)
        key = store.issue_key(name).plaintext
    if policy:
        admin = AdminClient(server.demo.dir / "state" / "admin.sock")
        admin.call("POST", f"/admin/tenants/{name}/policy", policy)
    return name, OpenAI(base_url=server.base_url, api_key=key, max_retries=0)


def chat(client: OpenAI, **extra: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=24,
        temperature=0,
        **extra,
    )


def test_a_denied_input_is_refused_naming_no_pattern(server: Server) -> None:
    pattern = r"(?i)your\s+products"
    _, client = tenant(server, deny_input=[pattern])
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client)
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"], error["type"]) == (
        "content_policy_violation",
        "messages",
        "invalid_request_error",
    )
    assert "products" not in error["message"]
    assert pattern not in error["message"]


def test_a_denied_output_never_reaches_the_client(server: Server) -> None:
    _, plain = tenant(server)
    full = chat(plain).choices[0].message.content
    assert len(full) > 30, full
    denied = full[10:24]  # from the middle, several tokens long
    name, client = tenant(server, deny_output=[re2.escape(denied)])
    expected = full[: full.index(denied)]

    reply = chat(client).choices[0]
    assert (reply.message.content, reply.finish_reason) == (expected, "content_filter")

    shown, finish = "", None
    for chunk in chat(client, stream=True):
        for choice in chunk.choices:
            shown += choice.delta.content or ""
            assert expected.startswith(shown)  # no chunk ever shows the start of the match
            finish = choice.finish_reason or finish
    assert (shown, finish) == (expected, "content_filter")

    with sqlite3.connect(server.demo.database) as db:
        rows = db.execute("select status, finish_reason from usage where tenant = ?", [name]).fetchall()
    assert rows == [(200, "content_filter"), (200, "content_filter")]
    with urllib.request.urlopen(server.local.metrics_url, timeout=30) as response:  # noqa: S310 (loopback)
        metrics = response.read().decode()
    assert f'lorabox_guardrail_actions_total{{kind="deny_output",tenant="{name}"}} 2.0' in metrics


def test_logprobs_are_refused_where_output_is_filtered(server: Server) -> None:
    _, client = tenant(server, redact_output=["email"])
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, logprobs=True)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["param"] == "logprobs"
