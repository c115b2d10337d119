"""One set of tenants, keys and policies for several boxes, without a daemon: `lorabox fleet export`
and `fleet import` between two state databases (no plaintext key in the document, a key issued on
one box works on the other, idempotent, an older export never overwrites a newer policy, a
revocation travels and is never undone), revocations through Redis, and `lorabox usage --rows` /
`--from` adding up two boxes' ledgers with every row counted once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.ops.cli import main
from appliance.tenancy import fleet
from appliance.tenancy.keysync import RevocationSync
from appliance.tenancy.redislimits import connect
from appliance.tenancy.store import Route, Store
from appliance.tenancy.writer import StoreWriter
from appliance.testing.redisserver import RedisServer


@dataclass
class Box:
    dir: Path

    @property
    def config(self) -> Path:
        return self.dir / "lorabox.toml"

    @property
    def database(self) -> Path:
        return self.dir / "state" / "lorabox.db"

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        code = main([*args, "--config", str(self.config)])
        out, err = capsys.readouterr()
        return code, out, err


@pytest.fixture
def boxes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Box, Box]:
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    made = []
    for name in ("box1", "box2"):
        box = Box(tmp_path / name)
        box.dir.mkdir()
        box.config.write_text(f'state_dir = "{box.dir / "state"}"\nadapters_dir = "{box.dir / "adapters"}"\n')
        made.append(box)
    return made[0], made[1]


def policy(box: Box, tenant: str) -> dict[str, Any]:
    with Store.open(box.database) as store:
        return store.policy_values(tenant)


def test_a_key_issued_on_one_box_works_on_the_other_and_the_document_holds_no_key(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one, two = boxes
    assert one.run(capsys, "tenant", "add", "umbrella", "--allow-base")[0] == 0
    code, key, _ = one.run(capsys, "key", "issue", "umbrella")
    key = key.strip()
    assert one.run(capsys, "tenant", "set", "umbrella", "--rpm", "10", "--quota-tokens", "5000")[0] == 0
    with Store.open(one.database) as store:
        store.save_route(Route("umbrella", pinned_version="v1", keep_resident=True))

    code, document, _ = one.run(capsys, "fleet", "export")
    assert code == 0
    assert key not in document
    assert key.split("-", 2)[2] not in document  # nor its secret part (which may hold a "-" itself)
    exported = tmp_path / "fleet.json"
    exported.write_text(document)

    code, out, err = two.run(capsys, "fleet", "import", str(exported))
    assert code == 0, err
    assert "tenants: 1 added; keys: 1 added, 0 revoked; policies: 1 updated; pins: 1 updated" in out
    with Store.open(two.database) as store:
        assert store.key_owner(key) == ("umbrella", key.split("-")[1])
        assert store.get_tenant("umbrella").allow_base_model  # type: ignore[union-attr]
        route = store.route("umbrella")
        assert (route.pinned_version, route.keep_resident) == ("v1", True)
    assert policy(two, "umbrella") == policy(one, "umbrella") == {"rpm": 10, "quota_tokens": 5000}

    code, out, _ = two.run(capsys, "fleet", "import", str(exported))  # again: nothing to do
    assert (code, out.splitlines()[-1]) == (0, "nothing changed")
    code, out, _ = one.run(capsys, "fleet", "import", str(exported))  # into the box it came from
    assert (code, out.splitlines()[-1]) == (0, "nothing changed")


def test_an_older_export_never_overwrites_a_newer_policy(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one, two = boxes
    one.run(capsys, "tenant", "add", "acme")
    one.run(capsys, "tenant", "set", "acme", "--rpm", "10")
    older = tmp_path / "older.json"
    older.write_text(one.run(capsys, "fleet", "export")[1])
    two.run(capsys, "fleet", "import", str(older))
    time.sleep(0.01)  # the stamps are milliseconds: the next change must come after
    two.run(capsys, "tenant", "set", "acme", "--rpm", "20")  # newer, on box two

    code, out, _ = two.run(capsys, "fleet", "import", str(older))
    assert code == 0
    assert "kept: acme's policy" in out
    assert policy(two, "acme") == {"rpm": 20}

    code, out, _ = two.run(capsys, "fleet", "import", str(older), "--dry-run")
    assert out.splitlines()[-1] == "nothing changed"
    time.sleep(0.01)
    one.run(capsys, "tenant", "set", "acme", "--rpm", "30")  # newer still, on box one
    newer = tmp_path / "newer.json"
    newer.write_text(one.run(capsys, "fleet", "export")[1])
    assert "policies: 1 updated" in two.run(capsys, "fleet", "import", str(newer), "--dry-run")[1]
    assert policy(two, "acme") == {"rpm": 20}  # a dry run writes nothing
    two.run(capsys, "fleet", "import", str(newer))
    assert policy(two, "acme") == {"rpm": 30}
    # Box one hears of box two's change the same way, newer only: its 30 is kept from the 20.
    assert "kept: acme's policy" in one.run(capsys, "fleet", "import", str(older))[1]


def test_a_revocation_travels_with_an_import_and_is_never_undone(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one, two = boxes
    one.run(capsys, "tenant", "add", "acme")
    key = one.run(capsys, "key", "issue", "acme")[1].strip()
    before = tmp_path / "before.json"
    before.write_text(one.run(capsys, "fleet", "export")[1])
    two.run(capsys, "fleet", "import", str(before))
    key_id = key.split("-")[1]
    one.run(capsys, "key", "revoke", key_id)
    after = tmp_path / "after.json"
    after.write_text(one.run(capsys, "fleet", "export")[1])

    assert "1 revoked" in two.run(capsys, "fleet", "import", str(after))[1]
    with Store.open(one.database) as a, Store.open(two.database) as b:
        assert b.key_owner(key) is None
        assert b.list_keys()[0]["revoked_at"] == a.list_keys()[0]["revoked_at"]
    two.run(capsys, "fleet", "import", str(before))  # the key active in an older document
    with Store.open(two.database) as b:
        assert b.key_owner(key) is None


def test_conflicts_are_reported_and_left_alone(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = boxes
    for box in boxes:
        box.run(capsys, "tenant", "add", "acme")
    with Store.open(one.database) as store:
        document = fleet.export(store, "box1")
    document["keys"] = [
        {
            "key_id": "0123abcd",
            "tenant": "acme",
            "key_hash": "a" * 64,
            "created_at": "2026-12-01T00:00:00+00:00",
            "revoked_at": None,
        }
    ]
    with Store.open(two.database) as store:
        store.import_key("acme", "lbx-0123abcd-" + "x" * 43)  # the same id, another key
        changes = fleet.plan(store, fleet.read(json.dumps(document)))
    assert changes.keys == []
    assert changes.conflicts == ["key 0123abcd: here it is another key (or another tenant's); left alone"]


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("not json", "not a fleet document (JSON)"),
        ('{"tenants": [], "keys": []}', 'no "format"'),
        ('{"format": "lorabox-fleet", "version": 99, "tenants": [], "keys": []}', "upgrade it first"),
        (
            '{"format": "lorabox-fleet", "version": 1, "tenants": [{"name": "../x"}], "keys": []}',
            "without a valid name",
        ),
        (
            '{"format": "lorabox-fleet", "version": 1, "tenants": [{"name": "acme"}], "keys": '
            '[{"key_id": "0123abcd", "tenant": "acme", "key": "lbx-0123abcd-secret"}]}',
            "not a SHA-256 hash",
        ),
        (
            '{"format": "lorabox-fleet", "version": 1, "tenants": [{"name": "acme", "policy": '
            '{"rpm": -5}, "policy_set_at": "2026-12-01T00:00:00+00:00"}], "keys": []}',
            "rpm",
        ),
    ],
)
def test_a_malformed_document_is_refused_whole_naming_the_problem(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str], tmp_path: Path, document: str, problem: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(document)
    code, out, err = boxes[1].run(capsys, "fleet", "import", str(path))
    assert (code, out) == (1, "")
    assert problem in err
    assert err.count("\n") == 1
    with Store.open(boxes[1].database) as store:
        assert store.list_tenants() == []


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if not RedisServer.available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop()


async def test_a_revocation_reaches_the_other_box_through_redis(
    boxes: tuple[Box, Box], redis_url: str
) -> None:
    stores = [Store.connect(box.database) for box in boxes]
    writers = [StoreWriter(box.database) for box in boxes]
    try:
        stores[0].add_tenant("acme")
        key = stores[0].issue_key("acme").plaintext
        stores[1].add_tenant("acme")
        stores[1].import_key("acme", key)
        syncs = [RevocationSync(connect(redis_url), s, w) for s, w in zip(stores, writers, strict=True)]
        assert await asyncio.gather(*(s.round() for s in syncs)) == [[], []]
        _, key_id = stores[0].revoke_key(key)
        assert await syncs[0].round() == []  # box one writes it to Redis
        assert await syncs[1].round() == [key_id]  # box two revokes it
        assert stores[1].key_owner(key) is None
        assert stores[1].list_keys()[0]["revoked_at"] == stores[0].list_keys()[0]["revoked_at"]
        assert await syncs[1].round() == []  # once
        for sync in syncs:
            await sync.client.aclose()
    finally:
        for writer in writers:
            await writer.close()
        for store in stores:
            store.db.close()


def usage_row(uid: str, tenant: str, prompt: int, completion: int, box: str | None) -> dict[str, Any]:
    return {
        "uid": uid,
        "box_id": box,
        "ts": "2026-12-01T10:00:00.000+00:00",
        "tenant": tenant,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "status": 200,
        "price_in": 1.0,
        "price_out": 2.0,
    }


def test_two_boxes_usage_merges_into_one_bill_each_row_once(
    boxes: tuple[Box, Box], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    one, two = boxes
    for box in boxes:
        box.run(capsys, "tenant", "list")  # makes the database
    with Store.open(one.database) as store:
        store.record_usage([usage_row("a1", "acme", 10, 5, "box1"), usage_row("a2", "acme", 1, 1, None)])
        own_id = store.box_id()
    with Store.open(two.database) as store:
        store.record_usage(
            [usage_row("b1", "acme", 100, 50, "box2"), usage_row("b2", "globex", 7, 0, "box2")]
        )
    exports = []
    for box in boxes:
        code, out, _ = box.run(capsys, "usage", "--rows")
        assert code == 0
        path = tmp_path / f"{box.dir.name}.csv"
        path.write_text(out)
        exports.append(str(path))
    assert f"a2,{own_id}," in Path(exports[0]).read_text()  # a row booked without a box: this one

    code, out, err = one.run(capsys, "usage", "--from", *exports, exports[0], "--csv")  # one file twice
    assert code == 0
    assert "merged 4 rows from 3 files (2 repeated: counted once)" in err
    header, acme, globex = (line.split(",") for line in out.splitlines())
    assert header == ["tenant", "tier", "requests", "prompt_tokens", "completion_tokens", "cost", "box_id"]
    assert acme[:6] == ["acme", "default", "3", "111", "56", "0.000223"]  # 10+1+100 at 1, 5+1+50 at 2 per M
    assert set(acme[6].split("+")) == {"box1", own_id, "box2"}
    assert globex == ["globex", "default", "1", "7", "0", "7e-06", "box2"]
    code, _, err = one.run(capsys, "usage", "--from", str(one.config))
    assert code == 1
    assert "not a usage export" in err
