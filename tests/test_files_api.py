"""The Files API (api/files.py, batch/files.py) on an app of its own: the official `openai` client
uploads, lists, reads and deletes; tenants are kept apart; caps refuse uploads as they stream in;
a crash's leftovers are swept. No engine: files need none."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from appliance.api.errors import MAX_BODY_BYTES, openai_errors
from appliance.api.files import add_routes
from appliance.api.services import SERVICES
from appliance.batch.files import FileStore, all_file_ids
from appliance.tenancy.policy import Policy
from appliance.tenancy.store import Store
from appliance.tenancy.writer import StoreWriter


@dataclasses.dataclass
class Box:
    url: str
    keys: dict[str, str]
    policies: dict[str, Policy]
    files: FileStore
    store: Store

    def client(self, tenant: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=0)


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Box]:
    database = tmp_path / "lorabox.db"
    keys = {}
    with Store.open(database) as setup:
        for tenant in ("acme", "globex"):
            setup.add_tenant(tenant)
            keys[tenant] = setup.issue_key(tenant).plaintext
    store = Store.connect(database)
    store.db.execute("PRAGMA query_only = 1")  # as the daemon's loop connection
    writer = StoreWriter(database)
    policies: dict[str, Policy] = {}
    admission = SimpleNamespace(policy_for=lambda tenant: policies.get(tenant, Policy()))
    app = web.Application(client_max_size=1 << 20, middlewares=[openai_errors])
    app[MAX_BODY_BYTES] = 1 << 20
    app[SERVICES] = SimpleNamespace(store=store, writer=writer, admission=admission)  # type: ignore[assignment]
    files = FileStore(tmp_path / "files")
    add_routes(app, files)
    server = TestServer(app)
    await server.start_server()
    try:
        yield Box(str(server.make_url("")).rstrip("/"), keys, policies, files, store)
    finally:
        await server.close()
        await writer.close()
        store.db.close()


def jsonl(lines: int) -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": {}}).encode()
        + b"\n"
        for i in range(lines)
    )


async def test_openai_client_uploads_lists_reads_and_deletes(box: Box) -> None:
    client = box.client("acme")
    data = jsonl(200)
    created = await client.files.create(file=("day.jsonl", data), purpose="batch")
    assert created.id.startswith("file-")
    assert created.bytes == len(data)
    assert (created.filename, created.purpose, created.status) == ("day.jsonl", "batch", "processed")
    got = await client.files.retrieve(created.id)
    assert got.model_dump() == created.model_dump()
    assert (await client.files.content(created.id)).content == data
    # On disk whole, private, under the tenant's folder; nothing left half-written.
    path = box.files.path("acme", created.id)
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o077 == 0
    assert list(path.parent.glob("*.partial")) == []

    second = await client.files.create(file=("b.jsonl", jsonl(3)), purpose="batch")
    page = await client.files.list()
    assert sorted(f.id for f in page.data) == sorted([second.id, created.id])
    assert not page.has_more
    # Paginated by cursor, as OpenAI's: every file once.
    seen = [f.id async for f in await client.files.list(limit=1)]
    assert sorted(seen) == sorted([created.id, second.id])

    deleted = await client.files.delete(created.id)
    assert deleted.deleted
    assert deleted.id == created.id
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)
    assert [f.id for f in (await client.files.list()).data] == [second.id]


async def test_another_tenant_sees_nothing(box: Box) -> None:
    acme, globex = box.client("acme"), box.client("globex")
    created = await acme.files.create(file=("a.jsonl", jsonl(2)), purpose="batch")
    for call in (
        globex.files.retrieve(created.id),
        globex.files.content(created.id),
        globex.files.delete(created.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            await call
        assert caught.value.body["code"] == "file_not_found"  # type: ignore[index]
    assert (await globex.files.list()).data == []
    assert (await acme.files.content(created.id)).content == jsonl(2)  # untouched
    # An id that is no file's (nor a path) is a 404 as well.
    for bad in ("file-..%2F..%2Florabox.db", "nonsense"):
        with pytest.raises(openai.NotFoundError):
            await acme.files.retrieve(bad)


async def test_caps_refuse_uploads_as_they_stream(box: Box) -> None:
    box.policies["acme"] = Policy(file_max_bytes=10_000, files_total_bytes=15_000, batch_max_lines=50)
    client = box.client("acme")
    with pytest.raises(openai.APIStatusError) as caught:
        await client.files.create(file=("big.jsonl", b"x" * 20_000 + b"\n"), purpose="batch")
    assert caught.value.status_code == 413
    with pytest.raises(openai.BadRequestError) as lines:
        await client.files.create(file=("many.jsonl", b"{}\n" * 51), purpose="batch")
    assert lines.value.body["code"] == "too_many_lines"  # type: ignore[index]
    # A last line without its newline is a line.
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("many.jsonl", b"{}\n" * 50 + b"{}"), purpose="batch")
    await client.files.create(file=("ok.jsonl", b"{}\n" * 50), purpose="batch")
    kept = await client.files.create(file=("ok.jsonl", b"y" * 9_000), purpose="batch")
    # The tenant's total: 150 + 9,000 stored; 9,000 more would cross 15,000.
    with pytest.raises(openai.APIStatusError) as total:
        await client.files.create(file=("more.jsonl", b"y" * 9_000), purpose="batch")
    assert total.value.status_code == 413
    assert total.value.body["code"] == "files_quota_exceeded"
    # Nothing of the refused uploads stayed: not on disk, not as rows.
    on_disk = {p.stem for p in (box.files.root / "acme").iterdir()}
    assert on_disk == {f.id for f in (await client.files.list()).data}
    assert kept.id in on_disk
    assert box.files.uploading == {}
    # Another tenant's caps are its own.
    await box.client("globex").files.create(file=("big.jsonl", b"x" * 20_000), purpose="batch")


async def test_bad_uploads_name_the_field(box: Box) -> None:
    key = box.keys["acme"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "fine-tune")
        form.add_field("file", b"{}\n", filename="a.jsonl")
        async with session.post(f"{box.url}/v1/files", data=form) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "purpose"
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        async with session.post(f"{box.url}/v1/files", data=form) as response:
            assert (await response.json())["error"]["param"] == "file"
        async with session.post(f"{box.url}/v1/files", json={"purpose": "batch"}) as response:
            assert response.status == 400
        async with session.get(f"{box.url}/v1/files?limit=0") as response:
            assert (await response.json())["error"]["param"] == "limit"
    assert list((box.files.root / "acme").glob("*")) == []  # the refused file was not kept
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{box.url}/v1/files") as response:
        assert response.status == 401


async def test_sweep_removes_what_no_row_names(box: Box) -> None:
    kept = await box.client("acme").files.create(file=("a.jsonl", jsonl(1)), purpose="batch")
    folder = box.files.root / "acme"
    (folder / "file-000000000000000000000000.partial").write_bytes(b"cut")
    (folder / "file-111111111111111111111111.jsonl").write_bytes(b"no row")
    removed = box.files.sweep(all_file_ids(box.store))
    assert {p.name for p in removed} == {
        "file-000000000000000000000000.partial",
        "file-111111111111111111111111.jsonl",
    }
    assert [p.stem for p in folder.iterdir()] == [kept.id]
