"""Retention and removal: old ledger rows go after their monthly totals are kept (the bill of a
closed period is unchanged), and `lorabox tenant remove [--purge]` leaves nothing a reused name
would inherit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from appliance.api.adminclient import AdminClient
from appliance.ops.cli import main
from appliance.tenancy import auditchain, retention
from appliance.tenancy.quota import timestamp
from appliance.tenancy.store import Store
from tests.conftest import Server

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def row(tenant: str, ts: datetime, prompt: int, completion: int, box: str | None = None) -> dict[str, object]:
    return {
        "uid": uuid.uuid4().hex,
        "box_id": box,
        "ts": timestamp(ts),
        "tenant": tenant,
        "key_id": "k",
        "model": tenant,
        "adapter_version": "v1",
        "endpoint": "chat",
        "engine": "vllm",
        "status": 200,
        "finish_reason": "stop",
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "latency_ms": 1.0,
        "price_in": 0.5,
        "price_out": 1.5,
    }


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store.connect(tmp_path / "lorabox.db")
    for tenant in ("acme", "globex"):
        store.add_tenant(tenant)
    rows = []
    for day in range(0, 200, 3):  # acme and globex: a row every third day for 200 days back
        for tenant in ("acme", "globex"):
            rows.append(row(tenant, NOW - timedelta(days=day, hours=day % 7), 100 + day, 10 + day % 5))
    rows.append(row("acme", NOW - timedelta(days=150), 7, 3, box="box-b"))
    rows.append(row("acme", NOW - timedelta(days=120), 50, 5) | {"tier": "batch", "batch_id": "batch_1"})
    store.record_usage(rows)
    return store


def test_retention_deletes_old_rows_and_keeps_every_closed_periods_totals(store: Store) -> None:
    by_month = store.usage_report(by="month")
    total = store.usage_report()
    assert ("acme", "batch", 1) in {(r["tenant"], r["tier"], r["requests"]) for r in total}
    deleted = retention.apply(store, {"acme": 40}.get, now=NOW)
    cutoff = timestamp(NOW - timedelta(days=40))
    assert deleted["acme"] > 0
    assert set(deleted) == {"acme"}  # globex keeps everything (no retention_days)
    old = store.db.execute("select count(*) from usage where tenant = 'acme' and ts < ?", [cutoff]).fetchone()
    assert old == (0,)
    assert store.db.execute("select count(*) from usage where tenant = 'acme'").fetchone()[0] > 0
    assert rounded(store.usage_report(by="month")) == rounded(by_month)
    assert rounded(store.usage_report()) == rounded(total)
    # Again: nothing more to delete, and the totals hold.
    assert retention.apply(store, {"acme": 40}.get, now=NOW) == {}
    assert rounded(store.usage_report()) == rounded(total)


def rounded(report: list[dict[str, object]]) -> list[dict[str, object]]:
    """Costs to a billionth: sums in another order differ in the last bits of a float."""
    return [{**r, "cost": round(float(r["cost"]), 9)} for r in report]  # type: ignore[arg-type]


def test_retention_days_is_a_policy_field_of_at_least_a_month(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nadapters_dir = "{tmp_path / "adapters"}"\n')
    main(["tenant", "add", "acme", "--config", str(config)])
    assert main(["tenant", "set", "acme", "--retention-days", "7", "--config", str(config)]) == 1
    assert "retention_days: must be between 31 and 365000, not 7" in capsys.readouterr().err
    assert main(["tenant", "set", "acme", "--retention-days", "90", "--config", str(config)]) == 0


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nadapters_dir = "{tmp_path / "adapters"}"\n')
    assert main(["tenant", "add", "acme", "--config", str(config)]) == 0
    assert main(["key", "issue", "acme", "--config", str(config)]) == 0
    assert (
        main(["tenant", "set", "acme", "--rpm", "5", "--deny-output", "secret", "--config", str(config)]) == 0
    )
    (tmp_path / "adapters" / "acme" / "v1").mkdir(parents=True)
    (tmp_path / "adapters" / "acme" / "v1" / "adapter_config.json").write_text("{}")
    with Store.open(tmp_path / "state" / "lorabox.db") as store:
        store.record_usage([row("acme", NOW, 10, 5)])
    return config


def leftovers(database: Path, name: str) -> dict[str, int]:
    with Store.open(database) as store:
        return {
            table: store.db.execute(f"select count(*) from {table} where tenant = ?", [name]).fetchone()[0]  # noqa: S608
            for table in (
                "api_keys",
                "tenant_policies",
                "routes",
                "adapter_versions",
                "usage",
                "usage_monthly",
                "files",
                "batches",
            )
        }


def test_remove_revokes_keys_archives_adapters_and_keeps_rows_under_another_name(
    box: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "state" / "lorabox.db"
    with Store.open(database) as store:
        key = store.list_keys("acme")[0]["key_id"]
    assert main(["tenant", "remove", "acme", "--config", str(box)]) == 0
    assert not (tmp_path / "adapters" / "acme").exists()
    [archived] = (tmp_path / "adapters" / ".archive").iterdir()
    assert (archived / "v1" / "adapter_config.json").exists()
    assert set(leftovers(database, "acme").values()) == {0}
    with Store.open(database) as store:
        assert store.get_tenant("acme") is None
        [(kept, count)] = store.db.execute("select tenant, count(*) from usage group by tenant").fetchall()
        assert kept.startswith("acme~removed-")
        assert count == 1
        actions = [r["action"] for r in store.audit_log("acme", 3)]
        assert actions[:2] == ["tenant_remove", "key_revoke"]
        assert key in store.audit_log("acme", 2)[1]["before"]
        assert not auditchain.verify(store.db).problem
    # The name again: nothing of the old tenant's.
    assert main(["tenant", "add", "acme", "--config", str(box)]) == 0
    with Store.open(database) as store:
        assert store.policy_values("acme") == {}
        assert store.list_keys("acme") == []
        assert store.tokens_since("2000-01-01") == {kept: 15}
        assert store.usage_report(tenant="acme") == []


def test_purge_asks_for_the_name_then_leaves_nothing(
    box: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = tmp_path / "state" / "lorabox.db"
    monkeypatch.setattr("sys.stdin", io.StringIO("acm\n"))
    assert main(["tenant", "remove", "acme", "--purge", "--config", str(box)]) == 1
    assert "not confirmed" in capsys.readouterr().err
    assert leftovers(database, "acme")["api_keys"] == 1  # nothing was removed
    monkeypatch.setattr("sys.stdin", io.StringIO("acme\n"))
    assert main(["tenant", "remove", "acme", "--purge", "--config", str(box)]) == 0
    assert not (tmp_path / "adapters" / "acme").exists()
    assert not (tmp_path / "adapters" / ".archive").exists()
    assert set(leftovers(database, "acme").values()) == {0}
    with Store.open(database) as store:
        assert store.db.execute("select count(*) from usage").fetchone() == (0,)
        assert store.audit_log("acme", 1)[0]["action"] == "tenant_remove"


def test_a_reused_name_starts_clean_on_a_running_daemon(server: Server) -> None:
    """The daemon forgets a removed tenant's quota use and policy: the next acme starts at zero."""
    name = f"reuse-{uuid.uuid4().hex[:10]}"
    admin = AdminClient(server.demo.dir / "state" / "admin.sock")
    with Store.open(server.demo.database) as store:
        store.add_tenant(name, allow_base_model=True)
        key = store.issue_key(name).plaintext
    admin.call("POST", f"/admin/tenants/{name}/policy", {"quota_tokens": 100_000, "rpm": 1000})
    client = OpenAI(base_url=server.base_url, api_key=key, max_retries=0)
    client.completions.create(model="lorabox-demo", prompt="Hello", max_tokens=3, temperature=0)
    assert admin.call("GET", f"/admin/tenants/{name}/policy")["quota"]["used_tokens"] > 0
    request = {"model": "lorabox-demo", "prompt": "Hello", "max_tokens": 1}
    line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": request})
    uploaded = client.files.create(file=("day.jsonl", io.BytesIO(line.encode() + b"\n")), purpose="batch")
    client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h")
    folder = server.demo.dir / "state" / "files" / name
    assert (folder / f"{uploaded.id}.jsonl").exists()

    cli = [sys.executable, "-m", "appliance", "tenant", "remove", name, "--config", str(server.demo.config)]
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    with pytest.raises(openai.AuthenticationError):  # its key, at once
        client.completions.create(model="lorabox-demo", prompt="Hello", max_tokens=1)

    assert not folder.exists()
    with Store.open(server.demo.database) as store:
        store.add_tenant(name, allow_base_model=True)
        again = OpenAI(base_url=server.base_url, api_key=store.issue_key(name).plaintext, max_retries=0)
    report = admin.call("GET", f"/admin/tenants/{name}/policy")
    assert report["quota"]["used_tokens"] == 0
    assert (again.files.list().data, again.batches.list().data) == ([], [])  # nothing of the old one's
    with pytest.raises(openai.NotFoundError):
        again.files.retrieve(uploaded.id)
    assert report["own"] == {}
    assert report["policy"]["rpm"] is None


def test_a_removed_tenant_leaves_the_service_keys_that_listed_it(store: Store) -> None:
    """A service key for acme does not reach a new tenant given acme's name; one for every tenant
    does, as it reaches any tenant added later."""
    listed = store.issue_service_key("agency", ["acme", "globex"])
    everyone = store.issue_service_key("backoffice", None)
    store.remove_tenant("acme")
    store.add_tenant("acme")
    scoped, unscoped = store.key_holder(listed.plaintext), store.key_holder(everyone.plaintext)
    assert scoped is not None
    assert unscoped is not None
    assert (scoped.may_act_for("acme"), scoped.may_act_for("globex")) == (False, True)
    assert unscoped.may_act_for("acme")
    assert not auditchain.verify(store.db).problem
