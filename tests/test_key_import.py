"""One tenant's key valid on several boxes: issued on one, imported on the others (only its hash
is kept), revoked on each."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from appliance.errors import StoreError
from appliance.ops.cli import main
from appliance.tenancy.store import Store


def box(directory: Path) -> Path:
    config = directory / "lorabox.toml"
    directory.mkdir()
    config.write_text(f'state_dir = "{directory / "state"}"\nadapters_dir = "{directory / "adapters"}"\n')
    assert main(["tenant", "add", "acme", "--config", str(config)]) == 0
    return config


def test_a_key_issued_on_one_box_is_imported_on_another(tmp_path, capsys, monkeypatch):
    first, second = box(tmp_path / "first"), box(tmp_path / "second")
    capsys.readouterr()
    assert main(["key", "issue", "acme", "--config", str(first)]) == 0
    key = capsys.readouterr().out.strip()

    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert main(["key", "import", "acme", "--config", str(second)]) == 0
    key_id = key.split("-")[1]
    assert capsys.readouterr().out == f"imported key {key_id} for tenant acme\n"
    with Store.open(tmp_path / "second" / "state" / "lorabox.db") as store:
        assert store.key_owner(key) == ("acme", key_id)
        assert key not in str(list(store.db.table("api_keys").rows))  # the hash only
        with pytest.raises(StoreError, match="already here"):
            store.import_key("acme", key)
        store.revoke_key(key_id)
        assert store.key_owner(key) is None


@pytest.mark.parametrize(
    "text", ["", "lbx-zz-abc", "sk-1234567890abcdef1234567890abcdef", "lbx-0123abcd-short"]
)
def test_anything_but_a_lorabox_key_is_refused(tmp_path, text):
    box(tmp_path / "b")
    with (
        Store.open(tmp_path / "b" / "state" / "lorabox.db") as store,
        pytest.raises(StoreError, match="not a lorabox key"),
    ):
        store.import_key("acme", text)


def test_an_unknown_tenant_is_refused(tmp_path):
    box(tmp_path / "b")
    with (
        Store.open(tmp_path / "b" / "state" / "lorabox.db") as store,
        pytest.raises(StoreError, match="no tenant"),
    ):
        store.import_key("globex", "lbx-0123abcd-" + "x" * 43)
