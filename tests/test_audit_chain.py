"""The audit log's hash chain: `lorabox audit --verify` and `--export`, against edits made with the
sqlite3 command-line tool, the way someone covering their tracks would make them."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.ops.cli import main
from appliance.tenancy import auditchain
from appliance.tenancy.store import Store

Lorabox = Callable[..., tuple[int, str, str]]


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "state" / "lorabox.db"


@pytest.fixture
def lorabox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Lorabox:
    for name in list(os.environ):
        if name.startswith("LORABOX_"):
            monkeypatch.delenv(name)
    config = tmp_path / "lorabox.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nadapters_dir = "{tmp_path / "adapters"}"\n')

    def lorabox(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--config", str(config)])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    lorabox("tenant", "add", "acme")
    lorabox("tenant", "set", "acme", "--rpm", "60")
    lorabox("tenant", "add", "globex")
    lorabox("tenant", "set", "globex", "--tpm", "1000")
    return lorabox


def sqlite3(database: Path, sql: str) -> None:
    subprocess.run(["sqlite3", str(database), sql], check=True, timeout=30)


def test_an_intact_log_verifies(lorabox: Lorabox) -> None:
    code, out, _ = lorabox("audit", "--verify")
    assert code == 0
    assert out.startswith("audit log intact: 4 rows, head ")


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        ("update audit_log set actor = 'someone else' where id = 2", "audit row 2 was edited"),
        ("update audit_log set after = '{}' where id = 3", "audit row 3 was edited"),
        (
            "delete from audit_log where id = 2",
            "audit row 3 does not follow row 1: the row(s) between 1 and 3 ",
        ),
        ("delete from audit_log where id = 4", "the last row(s) after 3, up to 4, were deleted"),
        (
            "insert into audit_log (ts, actor, action, tenant) "
            "values ('2026-01-01', 'x', 'tenant_set', 'acme')",
            "audit row 5 was edited or inserted",
        ),
        # An insertion that copies a genuine row's hashes is still out of place.
        (
            "insert into audit_log (id, ts, actor, action, tenant, before, after, prev_hash, hash) "
            "select 5, ts, actor, action, tenant, before, after, prev_hash, hash from audit_log where id = 4",
            "audit row 5 was edited or inserted",
        ),
    ],
)
def test_tampering_with_the_sqlite_file_is_named(
    lorabox: Lorabox, database: Path, tamper: str, named: str
) -> None:
    sqlite3(database, tamper)
    code, out, err = lorabox("audit", "--verify")
    assert code == 1
    assert out == ""
    assert named in err, err
    assert err.count("\n") == 1


def test_a_reordered_chain_is_named(lorabox: Lorabox, database: Path) -> None:
    """Two rows swapped, hashes and all: the id is part of what each hash covers."""
    sqlite3(database, "update audit_log set id = -id where id in (2, 3)")
    sqlite3(database, "update audit_log set id = 3 where id = -2; update audit_log set id = 2 where id = -3")
    code, _, err = lorabox("audit", "--verify")
    assert code == 1
    assert "audit row 2 was edited" in err


def test_export_writes_every_row_with_hashes_a_client_can_check(lorabox: Lorabox, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    code, out, _ = lorabox("audit", "--export", str(target))
    assert code == 0
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["action"] for r in rows] == ["tenant_add", "tenant_set", "tenant_add", "tenant_set"]
    # The client's own check, from the file alone: each hash is its row's, each row names the last.
    for previous, row in itertools.pairwise(rows):
        assert row["prev_hash"] == previous["hash"]
    assert all(auditchain.row_hash(row) == row["hash"] for row in rows)
    assert out.split("head ")[1].strip() == rows[-1]["hash"]


def test_an_export_of_a_tampered_log_is_refused(lorabox: Lorabox, database: Path, tmp_path: Path) -> None:
    sqlite3(database, "update audit_log set tenant = 'globex' where id = 1")
    code, _, err = lorabox("audit", "--export", str(tmp_path / "audit.jsonl"))
    assert code == 1
    assert "audit row 1 was edited" in err
    assert not (tmp_path / "audit.jsonl").exists()


def test_a_nullable_column_added_later_keeps_older_rows_valid(lorabox: Lorabox, database: Path) -> None:
    """What a later migration adding an audit column (as key_id, which key acted, was) does to the
    chain: nothing to the rows before it; the rows after it cover the new column."""
    with Store.open(database) as store:
        store.db.table("audit_log").add_column("later", str)
    assert lorabox("audit", "--verify")[0] == 0
    lorabox("tenant", "set", "acme", "--rpm", "61")
    sqlite3(database, "update audit_log set later = 'k1' where id = 5")
    code, _, err = lorabox("audit", "--verify")
    assert code == 1
    assert "audit row 5 was edited" in err
