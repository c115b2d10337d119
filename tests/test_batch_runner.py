"""The batch runner (batch/runner.py, batch/jobs.py) with a fake request core: validation, group
commits, a crash and a restart, cancel, quota, retries, expiry. Real SQLite, no engine."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.batch import jobs
from appliance.batch.files import FileStore, StoredFile, insert_file, new_file_id, write_file
from appliance.batch.runner import BatchRunner, Outcome
from appliance.tenancy.store import Store
from appliance.tenancy.writer import StoreWriter


@dataclass
class FakeCore:
    """Answers each line with its prompt upper-cased; counts runs and telemetry counts per prompt;
    each line's usage row names its prompt as the model."""

    runs: Counter[str] = field(default_factory=Counter)
    counted: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event | None = None
    """When set, lines wait for it (to hold them running)."""
    refuse: dict[str, Callable[[], Outcome | None]] = field(default_factory=dict)

    async def __call__(self, batch: jobs.Batch, body: str) -> Outcome:
        request = json.loads(body)
        prompt = request["prompt"]
        self.runs[prompt] += 1
        if self.gate is not None:
            await self.gate.wait()
        if prompt in self.refuse and (outcome := self.refuse[prompt]()) is not None:
            return outcome

        def count() -> None:
            self.counted[prompt] += 1

        usage = {"uid": uuid.uuid4().hex, "ts": "2026-12-07T00:00:00", "tenant": "acme", "key_id": "k1",
                 "model": prompt, "endpoint": "completions", "engine": "fake", "status": 200, "tier": "batch",
                 "batch_id": batch.id}  # fmt: skip
        body = {"text": prompt.upper()}
        return Outcome({"status_code": 200, "request_id": "r", "body": body}, usage=usage, count=count)


@dataclass
class Box:
    database: Path
    files: FileStore
    store: Store
    writer: StoreWriter
    core: FakeCore
    clock: list[float]

    def runner(self, max_running: int = 4, group: int = 64) -> BatchRunner:
        return BatchRunner(
            self.store,
            self.writer,
            self.files,
            self.core,
            ready=lambda: True,
            max_running=lambda: max_running,
            group=group,
            flush_s=3600,  # only full groups, and a batch's last lines, are committed: the test decides
            poll_s=0.01,
            clock=lambda: self.clock[0],
        )

    async def submit(self, lines: list[bytes], endpoint: str = "/v1/completions") -> str:
        file_id = new_file_id()
        write_file(self.files.path("acme", file_id), lines)
        stored = StoredFile(file_id, "acme", "in.jsonl", "batch", sum(map(len, lines)), len(lines), 0)
        await self.writer.call(insert_file, stored)
        created = int(self.clock[0])
        batch = jobs.Batch(
            jobs.new_batch_id(), "acme", "k1", "tenant", endpoint, file_id, "24h", None, "validating",
            None, None, None, 0, 0, 0, created, None, created + 86400, None, None, None, None, None, None,
        )  # fmt: skip
        await self.writer.call(jobs.insert_batch, batch)
        return batch.id

    def booked(self) -> Counter[str]:
        """The usage rows in the ledger, per prompt."""
        return Counter(row[0] for row in self.store.db.execute("select model from usage"))

    def batch(self, batch_id: str) -> jobs.Batch:
        found = jobs.get_batch(self.store, batch_id)
        assert found is not None
        return found

    def output(self, file_id: str | None) -> list[dict]:  # type: ignore[type-arg]
        if file_id is None:
            return []
        return [json.loads(line) for line in self.files.path("acme", file_id).read_text().splitlines()]

    async def until(self, batch_id: str, *statuses: str) -> jobs.Batch:
        await until(lambda: self.batch(batch_id).status in statuses)
        return self.batch(batch_id)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what the runner writes to the database or counts (no event to await)."""
    async with asyncio.timeout(30):
        while not condition():  # noqa: ASYNC110 (rows in the database; no event to await)
            await asyncio.sleep(0.005)


def request(custom_id: str, prompt: str, url: str = "/v1/completions") -> bytes:
    line = {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": "acme", "prompt": prompt}}
    return json.dumps(line).encode() + b"\n"


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[Box]:
    database = tmp_path / "lorabox.db"
    with Store.open(database) as setup:
        setup.add_tenant("acme")
    store = Store.connect(database)
    store.db.execute("PRAGMA query_only = 1")
    writer = StoreWriter(database)
    yield Box(database, FileStore(tmp_path / "files"), store, writer, FakeCore(), [1_000_000.0])
    await writer.close()
    store.db.close()


async def test_lines_run_once_and_bad_lines_become_error_lines(box: Box) -> None:
    lines = [request(f"c{i}", f"p{i}") for i in range(30)]
    lines[3] = b"{not json\n"
    lines[7] = request("c7", "p7", url="/v1/chat/completions")
    lines.insert(10, b"\n")  # blank lines are no requests
    batch_id = await box.submit(lines)
    async with box.runner(group=8).serving():
        batch = await box.until(batch_id, "completed")
    assert batch.openai()["request_counts"] == {"total": 30, "completed": 28, "failed": 2}
    assert batch.in_progress_at
    assert batch.finalizing_at
    assert batch.completed_at
    output = box.output(batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        f"c{i}" for i in range(30) if i not in (3, 7)
    )
    for line in output:
        assert line["response"]["body"]["text"] == "P" + line["custom_id"][1:]
        assert line["error"] is None
        assert line["id"].startswith("batch_req_")
    errors = box.output(batch.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (None, "invalid_json"),
        ("c7", "invalid_url"),
    ]
    assert set(box.core.runs.values()) == {1}
    assert box.booked() == box.core.runs
    assert box.core.counted == box.core.runs
    # The lines are gone with the batch's end; the output files are the tenant's, as OpenAI's.
    assert box.store.db.execute("select count(*) from batch_lines").fetchone()[0] == 0
    purposes = {
        r["purpose"]
        for r in box.store.db.query("select purpose from files where id != ?", [batch.input_file_id])
    }
    assert purposes == {"batch_output"}


async def test_duplicate_custom_id_fails_the_batch_at_validation(box: Box) -> None:
    batch_id = await box.submit([request("a", "x"), request("b", "y"), request("a", "z")])
    empty_id = await box.submit([b"\n"])
    async with box.runner().serving():
        batch = await box.until(batch_id, "failed")
        empty = await box.until(empty_id, "failed")
    errors = batch.openai()["errors"]["data"]
    assert errors[0]["code"] == "duplicate_custom_id"
    assert errors[0]["line"] == 3
    assert empty.openai()["errors"]["data"][0]["code"] == "empty_file"
    assert box.core.runs == Counter()


async def test_a_restart_neither_repeats_nor_loses_a_line(box: Box) -> None:
    """A crash (the runner dropped with a group uncommitted) and a restart: each line once in the
    output and booked once; the committed lines did not run again."""
    batch_id = await box.submit([request(f"c{i}", f"p{i}") for i in range(40)])
    core = box.core
    crashed = box.runner(max_running=1, group=10)
    loop = asyncio.create_task(crashed._loop())
    await until(lambda: box.batch(batch_id).completed >= 20 and sum(core.runs.values()) >= 25)
    loop.cancel()  # kill -9: no _stop_all, what ran since the last commit is lost
    for progress in crashed._progress.values():
        for task in progress.running.values():
            task.cancel()
    committed = box.batch(batch_id).completed
    assert committed in (20, 30)  # whole groups only
    assert sum(box.booked().values()) == committed  # what was not committed was not booked either

    async with box.runner(max_running=3, group=10).serving():
        batch = await box.until(batch_id, "completed")
    output = box.output(batch.output_file_id)
    assert Counter(line["custom_id"] for line in output) == Counter(f"c{i}" for i in range(40))
    assert batch.completed == 40
    assert box.booked() == Counter(f"p{i}" for i in range(40))  # each line booked once
    # The committed lines ran once; only the lost group's ran twice.
    assert sum(n - 1 for n in core.runs.values()) <= 10


async def test_cancel_ends_running_lines_and_keeps_the_finished(box: Box) -> None:
    batch_id = await box.submit([request(f"c{i}", f"p{i}") for i in range(20)])
    core = box.core
    core.gate = asyncio.Event()
    core.gate.set()
    runner = box.runner(max_running=2, group=1)
    async with runner.serving():
        await until(lambda: box.batch(batch_id).completed >= 5)
        core.gate.clear()  # the lines now running hang, as long generations
        await until(lambda: runner.running >= 2)
        assert await box.writer.call(jobs.cancel, batch_id, "acme") is not None
        assert box.batch(batch_id).status == "cancelling"
        runner.wake()
        batch = await box.until(batch_id, "cancelled")
    assert batch.cancelling_at
    assert batch.cancelled_at
    output = box.output(batch.output_file_id)
    assert len(output) == batch.completed
    assert batch.completed >= 5
    assert len({line["custom_id"] for line in output}) == len(output)
    assert batch.error_file_id is None  # the lines not run are not errors


async def test_quota_stops_the_batch_and_retries_wait(box: Box) -> None:
    tries = Counter[str]()

    def busy_once() -> Outcome | None:
        tries["p1"] += 1
        return Outcome(None, retry_after_s=5) if tries["p1"] == 1 else None

    box.core.refuse = {
        "p1": busy_once,
        "p6": lambda: Outcome(None, stop="quota used up"),
    }
    batch_id = await box.submit([request(f"c{i}", f"p{i}") for i in range(10)])
    async with box.runner(max_running=1, group=1).serving():
        await until(lambda: tries["p1"] >= 1)
        await asyncio.sleep(0.1)  # the runner may not take the line again before its retry time
        assert tries["p1"] == 1
        box.clock[0] += 6
        batch = await box.until(batch_id, "failed")
    assert tries["p1"] == 2
    output = box.output(batch.output_file_id)
    errors = box.output(batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"c{i}" for i in range(6)]
    assert sorted(e["custom_id"] for e in errors) == [f"c{i}" for i in range(6, 10)]
    assert {e["error"]["code"] for e in errors} == {"insufficient_quota"}
    assert batch.openai()["request_counts"] == {"total": 10, "completed": 6, "failed": 4}


async def test_a_batch_past_its_window_expires_with_its_finished_lines(box: Box) -> None:
    core = box.core
    core.gate = asyncio.Event()
    core.gate.set()
    batch_id = await box.submit([request(f"c{i}", f"p{i}") for i in range(10)])
    runner = box.runner(max_running=1, group=1)
    async with runner.serving():
        await until(lambda: box.batch(batch_id).completed >= 3)
        core.gate.clear()
        box.clock[0] += 86_400
        batch = await box.until(batch_id, "expired")
    assert batch.expired_at
    done = {line["custom_id"] for line in box.output(batch.output_file_id)}
    expired = {e["custom_id"] for e in box.output(batch.error_file_id)}
    assert len(done) >= 3
    assert done | expired == {f"c{i}" for i in range(10)}
    assert not done & expired
    assert {e["error"]["code"] for e in box.output(batch.error_file_id)} == {"batch_expired"}


def test_batch_prices_default_to_half_the_interactive_ones() -> None:
    from appliance.tenancy.policy import Policy, parse_value

    policy = Policy(price_in=2.0, price_out=8.0)
    assert policy.prices("default") == (2.0, 8.0)
    assert policy.prices("batch") == (1.0, 4.0)
    assert Policy(price_in=2.0, price_out=8.0, price_batch_in=0.5, price_batch_out=3.0).prices("batch") == (
        0.5,
        3.0,
    )
    assert parse_value("price_batch_in", "none") is None


async def test_a_line_committed_twice_is_counted_and_booked_once(box: Box) -> None:
    """A group already with the writer when the runner stopped is committed after all, and its lines
    run again after the restart: their second results are not counted, nor booked, again."""
    batch_id = await box.submit([request("c0", "p0"), request("c1", "p1")])
    box.core.gate = asyncio.Event()  # validated, and its lines hang until the test is done
    runner = box.runner(max_running=1, group=1)
    async with runner.serving():
        await box.until(batch_id, "in_progress")
        line = box.store.db.execute(
            "select min(line) from batch_lines where batch_id = ?", [batch_id]
        ).fetchone()[0]
        usage = {
            "uid": "u", "ts": "2026-12-07T00:00:00", "tenant": "acme", "key_id": "k1", "model": "p0",
            "adapter_version": "v1", "endpoint": "completions", "engine": "fake", "status": 200,
            "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1.0,
        }  # fmt: skip
        for uid in ("first", "again"):
            await box.writer.call(
                jobs.commit_results, batch_id, [(line, '{"a": 1}', False, usage | {"uid": uid})]
            )
        assert box.batch(batch_id).completed == 1
        assert box.booked() == Counter({"p0": 1})
        box.core.gate.set()
