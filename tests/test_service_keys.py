"""Service keys and tenant selection, and the quota's throttle, on the live server with the official
`openai` client: one key for several tenants, naming the tenant by header or URL prefix; a tenant
outside the key's list (or another tenant's, named with a tenant key) is the 404 of an unknown model,
byte for byte; usage and limits land on the named tenant, and the ledger says which key acted."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from appliance.errors import StoreError
from appliance.tenancy.admission import QUOTA_STATE_HEADER
from appliance.tenancy.store import Store
from tests.conftest import Server
from tests.test_qos import MODEL, Tenants

HEADER = "X-Lorabox-Tenant"


@pytest.fixture
def tenants(server: Server) -> Tenants:
    return Tenants(server)


def service_key(server: Server, tenants: list[str] | None, **limits: int) -> tuple[str, str]:
    """A service key for `tenants` (None: all): (key, key id)."""
    with Store.open(server.demo.database) as store:
        issued = store.issue_service_key("agency", tenants, **limits)
    return issued.plaintext, issued.key_id


def raw_post(server: Server, key: str, path: str = "/v1/completions", **headers: str) -> httpx.Response:
    return httpx.post(
        server.url + path,
        json={"model": "globex", "prompt": "Hello", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"} | headers,
        timeout=60,
    )


def ledger_rows(server: Server, key_id: str) -> list[tuple[str, str, int]]:
    with sqlite3.connect(server.demo.database) as db:
        rows = db.execute("select tenant, key_kind, status from usage where key_id = ? order by id", [key_id])
        return [(str(t), str(k), int(s)) for t, k, s in rows]


def test_a_service_key_serves_its_tenants_by_header_and_by_url_prefix(server: Server) -> None:
    key, key_id = service_key(server, ["acme"])
    by_header = OpenAI(base_url=server.base_url, api_key=key, default_headers={HEADER: "acme"})
    by_path = OpenAI(base_url=f"{server.url}/t/acme/v1", api_key=key)
    for client in (by_header, by_path):
        reply = client.completions.create(model="acme", prompt="Hello", max_tokens=3, temperature=0)
        assert reply.usage is not None
        assert reply.usage.completion_tokens >= 1
        assert [m.id for m in client.models.list().data] == [m.id for m in by_header.models.list().data]
        chat = client.chat.completions.create(
            model="acme", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
        )
        assert chat.choices[0].message.content is not None
    assert "acme" in [m.id for m in by_path.models.list().data]
    assert ledger_rows(server, key_id) == [("acme", "service", 200)] * 4  # usage lands on acme


def test_a_tenant_outside_the_keys_list_is_the_404_of_an_unknown_model(server: Server) -> None:
    key, key_id = service_key(server, ["acme"])
    unknown_model = raw_post(server, server.demo.keys["acme"])  # acme's own key asks for "globex"
    assert unknown_model.status_code == 404
    outside = raw_post(server, key, **{HEADER: "globex"})
    assert (outside.status_code, outside.content) == (404, unknown_model.content)
    by_path = raw_post(server, key, "/t/globex/v1/completions")
    assert (by_path.status_code, by_path.content) == (404, unknown_model.content)
    # A tenant key naming another tenant: the same answer; naming itself is fine.
    other = raw_post(server, server.demo.keys["acme"], "/t/globex/v1/completions")
    assert (other.status_code, other.content) == (404, unknown_model.content)
    itself = OpenAI(base_url=f"{server.url}/t/acme/v1", api_key=server.demo.keys["acme"])
    assert itself.completions.create(model="acme", prompt="Hi", max_tokens=1).choices
    # A tenant that does not exist: the same shape, for its name.
    nowhere = raw_post(server, key, **{HEADER: "no-such-tenant"})
    assert nowhere.status_code == 404
    assert nowhere.json()["error"] == unknown_model.json()["error"] | {
        "message": unknown_model.json()["error"]["message"].replace("globex", "no-such-tenant")
    }
    with pytest.raises(openai.NotFoundError):
        OpenAI(base_url=f"{server.url}/t/globex/v1", api_key=key).models.list()
    assert ledger_rows(server, key_id) == []  # nothing booked on anyone


def test_a_service_key_must_name_a_tenant_and_one_only(server: Server) -> None:
    key, _ = service_key(server, None)
    bare = raw_post(server, key)
    assert bare.status_code == 400
    assert bare.json()["error"]["code"] == "tenant_required"
    assert bare.json()["error"]["param"] == HEADER
    both = raw_post(server, key, "/t/acme/v1/completions", **{HEADER: "globex"})
    assert (both.status_code, both.json()["error"]["param"]) == (400, HEADER)


def test_limits_are_the_named_tenants_whichever_key_is_used(server: Server, tenants: Tenants) -> None:
    name, own_key = tenants.add(rpm=1)
    key, key_id = service_key(server, [name])
    assert tenants.post(key, **{}).status_code == 400  # the helper sends no tenant
    served = httpx.post(
        f"{server.url}/t/{name}/v1/completions",
        json={"model": MODEL, "prompt": "Hello", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert served.status_code == 200
    refused = tenants.post(own_key)  # the tenant's one request a minute went to the service key
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limit_exceeded")
    assert ledger_rows(server, key_id) == [(name, "service", 200)]


def test_a_service_key_may_carry_limits_of_its_own(server: Server, tenants: Tenants) -> None:
    first, _ = tenants.add()
    second, _ = tenants.add()
    key, _ = service_key(server, [first, second], rpm=1)
    client = OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_headers={HEADER: first})
    with pytest.raises(openai.RateLimitError) as refused:  # another tenant, the same key: its own limit
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_headers={HEADER: second})
    assert "service key" in refused.value.message
    assert 0 < int(refused.value.response.headers["Retry-After"]) <= 60


def test_a_throttled_tenant_is_served_slowly_then_refused_at_the_ceiling(tenants: Tenants) -> None:
    name, key = tenants.add(quota_tokens=1, quota_action="throttle", throttle_rpm=1, quota_hard_pct=None)
    served = tenants.post(key)  # it crosses the quota: served, throttled
    assert served.status_code == 200
    assert served.headers[QUOTA_STATE_HEADER] == "throttled"
    beyond = tenants.post(key)  # one request a minute while throttled
    assert (beyond.status_code, beyond.json()["error"]["code"]) == (429, "rate_limit_exceeded")
    assert beyond.headers[QUOTA_STATE_HEADER] == "throttled"
    assert 0 < int(beyond.headers["Retry-After"]) <= 60
    assert len(tenants.events(name, "quota_throttled")) == 1
    assert tenants.admin("GET", f"/admin/tenants/{name}/policy")["quota"]["state"] == "throttled"
    tenants.admin("POST", f"/admin/tenants/{name}/policy", {"quota_hard_pct": 100, "throttle_rpm": None})
    ceiling = tenants.post(key)
    assert (ceiling.status_code, ceiling.json()["error"]["code"]) == (429, "insufficient_quota")
    assert ceiling.headers.get("x-should-retry") == "false"


def test_the_admin_api_revokes_a_service_key_at_once(server: Server, tenants: Tenants) -> None:
    key, key_id = service_key(server, ["acme"])
    revoked = tenants.admin("POST", f"/admin/keys/{key_id}/revoke")
    assert (revoked["tenant"], revoked["revoked_at"] is not None) == ("service agency", True)
    assert raw_post(server, key, **{HEADER: "acme"}).status_code == 401


# -- the store and the CLI --------------------------------------------------------------------------


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.open(":memory:") as opened:
        for name in ("acme", "globex", "initech"):
            opened.add_tenant(name)
        yield opened


def test_a_service_key_acts_for_its_list_or_for_all(store: Store) -> None:
    listed = store.issue_service_key("agency", ["acme", "globex"], rpm=5)
    holder = store.key_holder(listed.plaintext)
    assert holder is not None
    assert (holder.kind, holder.service, holder.rpm, holder.tpm) == ("service", "agency", 5, None)
    assert [holder.may_act_for(t) for t in ("acme", "globex", "initech")] == [True, True, False]
    every = store.key_holder(store.issue_service_key("ops", None).plaintext)
    assert every is not None
    assert every.may_act_for("initech")
    own = store.key_holder(store.issue_key("acme").plaintext)
    assert own is not None
    assert (own.kind, own.tenant, own.may_act_for("globex")) == ("tenant", "acme", False)
    with pytest.raises(StoreError, match="no tenant named 'nope'"):
        store.issue_service_key("agency", ["acme", "nope"])


def test_revoking_a_service_key_is_at_once_and_audited_with_the_key(store: Store) -> None:
    issued = store.issue_service_key("agency", ["acme", "globex"])
    assert store.revoke_key(issued.key_id) == ("service agency", issued.key_id)
    assert store.key_holder(issued.plaintext) is None
    rows = store.db.execute("select action, tenant, key_id, key_kind from audit_log order by id").fetchall()
    keyed = [r for r in rows if r[2] == issued.key_id]
    assert keyed == [
        ("key_issue", "acme", issued.key_id, "service"),
        ("key_issue", "globex", issued.key_id, "service"),
        ("key_revoke", "acme", issued.key_id, "service"),
        ("key_revoke", "globex", issued.key_id, "service"),
    ]
    tenant_key = store.issue_key("acme")
    assert rows != store.db.execute("select action, tenant, key_id, key_kind from audit_log").fetchall()
    last = store.audit_log(limit=1)[0]
    assert (last["key_id"], last["key_kind"]) == (tenant_key.key_id, "tenant")
    assert json.loads(last["after"]) == {f"key {tenant_key.key_id}": "active"}


def test_the_cli_issues_lists_and_revokes_service_keys(tenants: Tenants) -> None:
    first, _ = tenants.add()
    issued = tenants.cli("key", "issue", "--service", "agency", "--tenants", first, "--rpm", "30")
    assert issued.returncode == 0, issued.stderr
    assert "service key agency" in issued.stderr
    key = issued.stdout.strip()
    listed = tenants.cli("key", "list", first)
    assert "service agency" in listed.stdout
    assert first in listed.stdout
    assert tenants.cli("key", "issue", "--service", "agency").returncode != 0  # no tenants named
    assert tenants.cli("key", "issue", first, "--tenants", first).returncode != 0  # not a service key
    key_id = key.split("-")[1]
    assert tenants.cli("key", "revoke", key_id).returncode == 0
    refused = httpx.post(
        f"{tenants.server.url}/t/{first}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    assert refused.status_code == 401
