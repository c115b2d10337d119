"""The llama.cpp engine answers every tenant exactly as HF transformers + PEFT does, through the API.

The parity tests of test_tenant_outputs.py run here again, unchanged, against the session's
llama.cpp daemon: every demo tenant and the base model, completions and chats, and 36 requests
from all tenants in flight at once. Then what is particular to this engine: prefix reuse, which
must never cross an adapter or a tenant.
"""

from __future__ import annotations

import pytest
from openai import OpenAI

from appliance.api.adminclient import AdminClient
from appliance.demo.build import DEMO_TENANTS
from tests.conftest import Reference, Server
from tests.test_tenant_outputs import (  # noqa: F401 (collected and run here, on llama.cpp)
    test_base_model_matches_plain_transformers,
    test_chat_matches_peft_reference,
    test_completion_matches_peft_reference,
    test_interleaved_tenants_never_mix,
)

MAX_TOKENS = 12
# Long enough that reusing another tenant's cached prefix would change the answer.
SHARED_PREFIX = (
    "Every client of the agency gets answers shaped by its own adapter, and no client ever sees "
    "another client's adapter or cached prompt. The operator drops a folder"
)


@pytest.fixture(scope="module")
def server(llamacpp_server: Server) -> Server:
    return llamacpp_server


@pytest.fixture(scope="module")
def reference(llamacpp_reference: Reference) -> Reference:
    return llamacpp_reference


def test_the_daemon_runs_llamacpp(server):
    status = AdminClient(server.demo.dir / "state" / "admin.sock").call("GET", "/admin/status")
    assert status["engine"] == "llamacpp"
    assert status["engine_reason"] == "engine=llamacpp (configured)"
    assert status["engine_stats"]["extra"]["model"] == str(server.demo.dir / "model.gguf")


def _reused_tokens(server: Server) -> int:
    status = AdminClient(server.demo.dir / "state" / "admin.sock").call("GET", "/admin/status")
    return int(status["engine_stats"]["extra"]["prefix_reused_tokens"])


def _complete(server: Server, caller: str, model: str, prompt: str) -> str:
    client = OpenAI(base_url=server.base_url, api_key=server.demo.keys[caller], max_retries=0)
    response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    return response.choices[0].text


def _expected(reference: Reference, adapter: str | None, prompt: str) -> str:
    return reference.text(reference.generate(adapter, reference.prompt_ids(prompt), MAX_TOKENS))


def test_shared_prefix_is_reused_within_a_tenant_never_across(server, reference, base_model_name):
    first, second = (t.name for t in DEMO_TENANTS[:2])
    prompts = [f"{SHARED_PREFIX}{tail}" for tail in (", the daemon", " and the next", ", then")]
    shared = len(reference.prompt_ids(SHARED_PREFIX)) - 1  # the last prefix token may merge onward

    # The same tenant and adapter: the second request reuses the first one's cached prefix.
    assert _complete(server, first, first, prompts[0]) == _expected(reference, first, prompts[0])
    before = _reused_tokens(server)
    assert _complete(server, first, first, prompts[1]) == _expected(reference, first, prompts[1])
    assert _reused_tokens(server) - before >= shared

    # Another tenant with the same prefix gets its own answer, computed from nothing.
    before = _reused_tokens(server)
    assert _complete(server, second, second, prompts[2]) == _expected(reference, second, prompts[2])
    # The base model asked by two tenants: same weights, yet no tenant reads another's cache.
    assert _complete(server, first, base_model_name, prompts[0]) == _expected(reference, None, prompts[0])
    assert _complete(server, second, base_model_name, prompts[1]) == _expected(reference, None, prompts[1])
    assert _reused_tokens(server) == before
