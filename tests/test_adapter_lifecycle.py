"""The drop folder while serving: hot registration, version switches, rollback, canary, refusals.

One server for this module, on its own demo directory, so that its drops disturb no other test.
Each test uses its own tenants; the order of tests does not matter.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from openai import AsyncOpenAI, NotFoundError, OpenAI

from appliance.api.adminclient import AdminClient, AdminError
from appliance.demo.build import DemoTenant, build_adapter, init_demo
from appliance.tenancy.store import Store
from appliance.testing.loadclock import LoadClock, wait_within
from appliance.testing.localserver import LocalServer
from tests.conftest import Demo, Reference

PROMPT = "The quick brown fox"
MAX_TOKENS = 12


class Lab:
    def __init__(self, demo: Demo, server: LocalServer):
        self.demo, self.server = demo, server
        self.reference = Reference(demo)
        self.prompt_ids = self.reference.prompt_ids(PROMPT)

    @property
    def adapters(self) -> Path:
        return self.demo.dir / "adapters"

    def tenant(self, name: str) -> str:
        """Create a tenant and return a fresh key for it, as `lorabox tenant add` + `key issue` do."""
        with Store.open(self.demo.database) as store:
            if not store.get_tenant(name):
                store.add_tenant(name)
            return store.issue_key(name).plaintext

    def stage(self, tenant: str, version: str, seed: int) -> Path:
        """Build under a dot name, which the watcher ignores until it is renamed into place."""
        staging = self.adapters / tenant / f".{version}.partial"
        build_adapter(self.demo.model_dir, DemoTenant(tenant, 8, 16, ("q_proj", "v_proj"), seed), staging)
        return staging

    def drop(self, tenant: str, version: str, seed: int) -> Path:
        """Stage, then rename into place: how operators are told to drop."""
        return self.stage(tenant, version, seed).rename(self.adapters / tenant / version)

    def two_versions(self, tenant: str, seed: int) -> tuple[str, str, str]:
        """A tenant serving v2, with v1 registered beside it: (key, v1's answer, v2's answer)."""
        key = self.tenant(tenant)
        v1 = self.expected(self.drop(tenant, "v1", seed=seed))
        self.wait_serving(key, tenant, v1)
        v2 = self.expected(self.drop(tenant, "v2", seed=seed + 1))
        self.wait_serving(key, tenant, v2)
        return key, v1, v2

    def expected(self, folder: Path) -> str:
        return self.reference.text(self.reference.generate(folder, self.prompt_ids, MAX_TOKENS))

    def client(self, key: str) -> OpenAI:
        return OpenAI(base_url=self.server.base_url, api_key=key, max_retries=0)

    def complete(self, key: str, model: str, **extra: object) -> str:
        response = self.client(key).completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, **extra
        )
        return response.choices[0].text

    def answer(self, key: str, model: str) -> str | None:
        """The model's answer, or None while the watcher has not made it servable yet (404)."""
        try:
            return self.complete(key, model)
        except NotFoundError:
            return None

    def wait_serving(self, key: str, model: str, expected: str, timeout: float = 15) -> None:
        """Wait until `model` answers `expected`; any failure other than "not there yet" fails the test."""
        self.wait_for(lambda: self.answer(key, model) == expected, timeout=timeout)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "appliance", *args, "--config", str(self.demo.config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    def admin(self, path: str, body: object = None) -> dict:  # type: ignore[type-arg]
        """GET `path`, or POST `body` to it."""
        client = AdminClient(self.demo.dir / "state" / "admin.sock")
        return client.call("GET" if body is None else "POST", path, body)  # type: ignore[no-any-return]

    def wait_for(
        self, predicate: Callable[[], object], timeout: float = 20, interval: float = 0.05
    ) -> object:
        """`predicate()`'s first true value, within `timeout` s of the server's time less its and
        this thread's waits for a CPU (LoadClock): a busy machine makes a drop slower, not red."""
        clock = LoadClock([self.server.process.pid])
        return wait_within(clock, timeout, predicate, "condition", poll_s=interval)

    def adapter_row(self, tenant: str, version: str) -> dict | None:  # type: ignore[type-arg]
        rows = self.admin("/admin/adapters")["adapters"]
        return next((r for r in rows if r["tenant"] == tenant and r["version"] == version), None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("lab")
    demo = Demo(directory, init_demo(directory))
    server = LocalServer.start(demo.config, directory / "server.log")
    yield Lab(demo, server)
    server.stop()


class Load:
    """Background requests for one tenant, recording every answer and every failure."""

    def __init__(self, lab: Lab, key: str, model: str, workers: int = 3):
        self.lab, self.key, self.model, self.workers = lab, key, model, workers
        self.answers: list[tuple[float, str]] = []  # (when the request was sent, its answer)
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        client = AsyncOpenAI(base_url=self.lab.server.base_url, api_key=self.key, max_retries=0)

        async def worker() -> None:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = await client.completions.create(
                        model=self.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
                    )
                    self.answers.append((sent, response.choices[0].text))
                except Exception as exc:
                    self.failures.append(exc)

        await asyncio.gather(*(worker() for _ in range(self.workers)))

    def __enter__(self) -> Load:
        self._thread.start()
        self.lab.wait_for(lambda: len(self.answers) >= 3)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_new_tenant_dropped_under_load_answers_quickly(lab):
    busy = lab.tenant("acme")
    key = lab.tenant("delta")
    staged = lab.stage("delta", "v1", seed=4001)
    expected = lab.expected(staged)  # the reference is computed before the clock starts
    with Load(lab, busy, "acme") as load:
        staged.rename(staged.with_name("v1"))
        # Servable within 15 s of the drop (of the server's time: see Lab.wait_for).
        text = lab.wait_for(lambda: lab.answer(key, "delta"), timeout=15, interval=0.02)
    assert text == expected
    assert not load.failures
    assert len({answer for _, answer in load.answers}) == 1  # acme kept its own answer throughout


def test_v2_takes_over_without_dropping_or_mixing(lab):
    key = lab.tenant("echo")
    v1 = lab.expected(lab.drop("echo", "v1", seed=5001))
    lab.wait_for(lambda: lab.adapter_row("echo", "v1") and lab.adapter_row("echo", "v1")["active"])
    v2_folder_seed = 5002
    with Load(lab, key, "echo", workers=4) as load:
        time.sleep(0.5)
        v2 = lab.expected(lab.drop("echo", "v2", seed=v2_folder_seed))
        assert v1 != v2
        lab.wait_for(lambda: any(answer == v2 for _, answer in load.answers), timeout=15)
        switched = time.monotonic()
        lab.wait_for(lambda: len([sent for sent, _ in load.answers if sent > switched]) >= 4)
    assert not load.failures
    assert {answer for _, answer in load.answers} <= {v1, v2}  # never a mix within one response
    # Requests sent after the first v2 answer arrived (so after the switch) are all v2.
    after = [answer for sent, answer in load.answers if sent > switched]
    assert after
    assert all(answer == v2 for answer in after)
    # Once its requests drained, v1 left the engine (unloaded, not merely inactive).
    v1_row = lab.adapter_row("echo", "v1")
    assert v1_row is not None
    assert not v1_row["active"]
    assert not v1_row["loaded"]
    events = [line.split() for line in lab.cli("events", "--limit", "500").stdout.splitlines()]
    assert ["adapter_activated", "echo", "v2"] in [e[1:4] for e in events]
    assert ["adapter_unloaded", "echo", "v1"] in [e[1:4] for e in events]
    assert lab.complete(key, "echo") == v2
    assert lab.complete(key, "echo@v1") == v1  # the old version stays callable by name


def test_rollback_restores_exact_v1_outputs_then_unpin(lab):
    key, v1, _ = lab.two_versions("foxtrot", seed=6001)

    rolled = lab.cli("adapters", "activate", "foxtrot", "v1")
    assert rolled.returncode == 0, rolled.stderr
    assert [lab.complete(key, "foxtrot") for _ in range(3)] == [v1] * 3
    assert "adapter_rolled_back" in lab.cli("events").stdout
    # A pinned tenant stays on its pin when a newer version arrives.
    v3 = lab.expected(lab.drop("foxtrot", "v3", seed=6003))
    lab.wait_for(lambda: lab.adapter_row("foxtrot", "v3"))
    assert lab.complete(key, "foxtrot") == v1

    unpinned = lab.cli("adapters", "unpin", "foxtrot")
    assert unpinned.returncode == 0, unpinned.stderr
    assert lab.complete(key, "foxtrot") == v3
    missing = lab.cli("adapters", "activate", "foxtrot", "v9")
    assert missing.returncode == 1
    assert "not a servable version" in missing.stderr


def test_canary_share_is_binomial_and_sticky(lab):
    key, v1, v2 = lab.two_versions("golf", seed=7001)

    set_canary = lab.cli("adapters", "canary", "golf", "v1", "--percent", "30")
    assert set_canary.returncode == 0, set_canary.stderr

    async def many(n: int) -> list[str]:
        client = AsyncOpenAI(base_url=lab.server.base_url, api_key=key, max_retries=0)
        semaphore = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with semaphore:
                response = await client.completions.create(
                    model="golf", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, user=f"user-{i}"
                )
                return response.choices[0].text

        return await asyncio.gather(*(one(i) for i in range(n)))

    answers = asyncio.run(many(240))
    assert set(answers) <= {v1, v2}
    to_canary = answers.count(v1)
    # Binomial(240, 0.3): mean 72, sd 7.1; the band is about ±4.5 sd.
    assert 40 <= to_canary <= 104, to_canary
    # Sticky: the same user always lands on the same version.
    sticky = {lab.complete(key, "golf", user="user-7") for _ in range(5)}
    assert len(sticky) == 1
    rows = {r["version"]: r for r in lab.admin("/admin/adapters")["adapters"] if r["tenant"] == "golf"}
    assert rows["v1"]["canary_percent"] == 30
    assert rows["v1"]["requests"] >= to_canary
    assert lab.cli("adapters", "canary", "golf", "v1", "--percent", "0").returncode == 0
    assert {lab.complete(key, "golf", user=f"u{i}") for i in range(12)} == {v2}


def _truncate(path: Path, keep: int) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    return data


def _refusal(lab: Lab, tenant: str, version: str) -> str:
    row = lab.wait_for(lambda: (r := lab.adapter_row(tenant, version)) and r["state"] == "refused" and r)
    return str(row["reason"])  # type: ignore[index]


def test_half_written_adapter_is_refused_then_served_once_complete(lab):
    key = lab.tenant("hotel")
    v1 = lab.expected(lab.drop("hotel", "v1", seed=8001))
    lab.wait_serving(key, "hotel", v1)
    # A copy straight into the final name (no rename), caught half-way.
    staged = lab.drop("hotel", ".v2-source", seed=8002)
    expected_v2 = lab.expected(staged)
    target = lab.adapters / "hotel" / "v2"
    target.mkdir()
    shutil.copy(staged / "adapter_config.json", target)
    weights = (staged / "adapter_model.safetensors").read_bytes()
    (target / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "incomplete" in _refusal(lab, "hotel", "v2")
    assert lab.complete(key, "hotel") == v1
    (target / "adapter_model.safetensors").write_bytes(weights)
    lab.wait_serving(key, "hotel", expected_v2)


def _write_broken(lab: Lab, tenant: str, version: str, seed: int, breaker: Callable[[Path], None]) -> None:
    folder = lab.adapters / tenant / f".{version}.partial"
    build_adapter(lab.demo.model_dir, DemoTenant(tenant, 8, 16, ("q_proj", "v_proj"), seed), folder)
    breaker(folder)
    folder.rename(lab.adapters / tenant / version)


def _pickled(folder: Path) -> None:
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2)}, folder / "adapter_model.bin")


def _config(**changes: object) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | changes))

    return change


def _wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    name = next(n for n in tensors if "lora_A" in n)
    tensors[name] = torch.zeros(8, 64)
    save_file(tensors, folder / "adapter_model.safetensors")


def _escape(folder: Path) -> None:
    outside = folder.parents[2] / "outside-weights.safetensors"
    (folder / "adapter_model.safetensors").rename(outside)
    (folder / "adapter_model.safetensors").symlink_to(outside)


def _garbage_header(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json :-)")


BROKEN = [
    ("v2", _pickled, "pickle"),
    ("v3", _config(r=32), "max_lora_rank"),
    ("v4", _config(target_modules=["wizard_proj"]), "selects no module of the base model"),
    ("v5", _wrong_shape, "shape"),
    ("v6", _escape, "leaves the adapters directory"),
    ("v7", _garbage_header, "not a safetensors file"),
    ("v8", _config(peft_type="PREFIX_TUNING"), "peft_type"),
]


def test_broken_drops_are_refused_with_reasons_and_v1_keeps_serving(lab):
    key = lab.tenant("india")
    v1 = lab.expected(lab.drop("india", "v1", seed=9001))
    lab.wait_serving(key, "india", v1)
    for index, (version, breaker, reason) in enumerate(BROKEN):
        _write_broken(lab, "india", version, 9100 + index, breaker)
        assert reason in _refusal(lab, "india", version), version
        assert lab.complete(key, "india") == v1
    listed = lab.cli("adapters", "list", "india")
    assert listed.returncode == 0
    states = [line.split()[2] for line in listed.stdout.splitlines()[1:] if line.split()[1] != "v1"]
    assert states == ["refused"] * len(BROKEN)


def test_hostile_names_and_escapes_never_register(lab):
    outside = lab.demo.dir / "elsewhere"
    build_adapter(lab.demo.model_dir, DemoTenant("juliet", 8, 16, ("q_proj",), 9901), outside)
    (lab.adapters / "juliet").mkdir()
    (lab.adapters / "juliet" / "v1").symlink_to(outside, target_is_directory=True)
    for name in ("bad name", "tenänt", "UPPER"):
        shutil.copytree(outside, lab.adapters / name / "v1")
    shutil.copytree(outside, lab.adapters / "kilo" / "v 2")
    shutil.copytree(outside, lab.adapters / "kilo" / "vé")

    def refused_events() -> str:
        events = lab.cli("events", "--limit", "500").stdout
        wanted = ("bad name", "tenänt", "UPPER", "v 2", "vé")
        return events if all(w in events for w in wanted) else ""

    events = str(lab.wait_for(refused_events))
    assert "invalid tenant folder name" in events
    assert "invalid version folder name" in events
    assert "leaves the adapters directory" in _refusal(lab, "juliet", "v1")
    tenants = {r["tenant"] for r in lab.admin("/admin/adapters")["adapters"] if r["state"] == "ready"}
    assert tenants.isdisjoint({"bad name", "tenänt", "UPPER", "juliet", "kilo"})


def test_deleting_the_active_version_falls_back(lab):
    key, v1, _ = lab.two_versions("lima", seed=9501)
    shutil.rmtree(lab.adapters / "lima" / "v2")
    lab.wait_serving(key, "lima", v1)
    assert lab.adapter_row("lima", "v2") is None


def test_residency_report_is_consistent(lab):
    report = lab.admin("/admin/residency")
    plan, counts, rows = report["plan"], report["counts"], report["adapters"]
    assert sum(counts.values()) == len(rows)
    assert counts["gpu"] <= plan["max_loras"]
    assert counts["gpu"] + counts["cpu"] <= plan["max_cpu_loras"]
    ready = [r for r in lab.admin("/admin/adapters")["adapters"] if r["state"] == "ready"]
    assert len(rows) == len(ready)
    assert {r["tier"] for r in rows} <= {"gpu", "cpu", "disk"}


def _residency_row(lab: Lab, tenant: str) -> dict:  # type: ignore[type-arg]
    rows = [r for r in lab.admin("/admin/residency")["adapters"] if r["tenant"] == tenant]
    active = lab.admin("/admin/adapters")["adapters"]
    version = next(r["version"] for r in active if r["tenant"] == tenant and r["active"])
    return next(r for r in rows if r["version"] == version)


def test_pinned_tenant_keeps_its_slot_while_more_tenants_than_slots_run(lab):
    """vLLM 0.32 alone crashes here: its scheduler ignores pinned slots (see engines/slots.py)."""
    slots = lab.admin("/admin/status")["engine_stats"]["gpu_slots"]
    names = ["mike", "november", "oscar", "papa", "quebec", "romeo"]
    assert len(names) > slots  # more adapters at once than the engine has slots
    keys, expected = {}, {}
    for index, name in enumerate(names):
        keys[name] = lab.tenant(name)
        expected[name] = lab.expected(lab.drop(name, "v1", seed=9700 + index))
    for name in names:
        lab.wait_serving(keys[name], name, expected[name])

    pinned = lab.cli("residency", "pin", "mike")
    assert pinned.returncode == 0, pinned.stderr
    assert "v1 is pinned in a GPU slot" in pinned.stdout
    assert _residency_row(lab, "mike")["pinned"]

    async def crowd() -> list[tuple[str, str]]:
        url = lab.server.base_url
        clients = {n: AsyncOpenAI(base_url=url, api_key=keys[n], max_retries=0) for n in names}

        async def one(name: str) -> tuple[str, str]:
            response = await clients[name].completions.create(
                model=name, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
            )
            return name, response.choices[0].text

        # The other five first: with the pinned one idle, they alone would fill every slot.
        order = [names[1 + i % (len(names) - 1)] for i in range(40)] + ["mike"] * 8
        return await asyncio.gather(*(one(name) for name in order))

    answers = asyncio.run(crowd())
    assert [text for _, text in answers] == [expected[name] for name, _ in answers]
    row = _residency_row(lab, "mike")
    assert (row["tier"], row["pinned"]) == ("gpu", True)
    stats = lab.admin("/admin/status")["engine_stats"]
    assert any(name.startswith("mike@v1#") for name in stats["pinned"])

    # Bad requests to the admin API change nothing.
    for path, body, status, message in [
        ("/admin/tenants/mike/resident", {"keep": "yes"}, 400, "keep must be true or false"),
        ("/admin/tenants/mike/resident", [True], 400, "keep must be true or false"),
        ("/admin/tenants/..%2Fmike/resident", {"keep": True}, 400, "not a tenant name"),
        ("/admin/tenants/nobody/resident", {"keep": True}, 409, "unknown tenant"),
    ]:
        with pytest.raises(AdminError, match=message) as refused:
            lab.admin(path, body)
        assert refused.value.status == status
    assert lab.admin("/admin/residency")["kept_resident"] == ["mike"]

    # A new version takes over the pin.
    v2 = lab.expected(lab.drop("mike", "v2", seed=9799))
    lab.wait_serving(keys["mike"], "mike", v2)
    lab.wait_for(
        lambda: _residency_row(lab, "mike")["version"] == "v2" and _residency_row(lab, "mike")["pinned"]
    )
    assert _residency_row(lab, "mike")["tier"] == "gpu"

    # One slot always stays unpinned.
    report = lab.admin("/admin/residency")
    allowed = report["pinnable_slots"]
    others = names[1:allowed]
    for name in others:
        assert lab.cli("residency", "pin", name).returncode == 0
    refused = lab.cli("residency", "pin", names[allowed])
    assert refused.returncode == 1
    assert "one must stay free" in refused.stderr
    assert set(lab.admin("/admin/residency")["kept_resident"]) >= {"mike", *others}

    for name in ["mike", *others]:
        released = lab.cli("residency", "unpin", name)
        assert released.returncode == 0, released.stderr
    assert not _residency_row(lab, "mike")["pinned"]
    assert lab.admin("/admin/status")["engine_stats"]["pinned"] == []
    assert [lab.complete(keys[n], n) for n in names] == [v2, *(expected[n] for n in names[1:])]
    events = lab.cli("events", "--limit", "500").stdout
    assert "residency_pinned" in events
    assert "residency_unpinned" in events


def test_two_hundred_tenants_start_register_and_answer(tmp_path_factory):
    """200 tenants' adapters present at start-up: all registered, warm, correct, consistently reported."""
    directory = tmp_path_factory.mktemp("crowd")
    demo = Demo(directory, init_demo(directory))
    names = [f"t{i:03d}" for i in range(200)]
    with Store.open(demo.database) as store:
        keys = {}
        for i, name in enumerate(names):
            build_adapter(
                demo.model_dir,
                DemoTenant(name, 8, 16, ("q_proj", "v_proj"), 20_000 + i),
                directory / "adapters" / name / "v1",
            )
            store.add_tenant(name)
            keys[name] = store.issue_key(name).plaintext
    server = LocalServer.start(demo.config, directory / "server.log")
    try:
        crowd = Lab(demo, server)
        rows = [r for r in crowd.admin("/admin/adapters")["adapters"] if r["tenant"] in keys]
        assert len(rows) == 200
        assert all(r["state"] == "ready" and r["active"] and r["loaded"] for r in rows)
        for name in names[::25] + names[-1:]:
            assert crowd.complete(keys[name], name) == crowd.expected(demo.adapter_dir(name))
        report = crowd.admin("/admin/residency")
        plan, counts = report["plan"], report["counts"]
        assert sum(counts.values()) == len(report["adapters"]) == 203  # and the 3 demo tenants
        assert counts["gpu"] <= plan["max_loras"]
        assert counts["gpu"] + counts["cpu"] <= plan["max_cpu_loras"]
        assert plan["max_cpu_loras"] >= 203  # the planner keeps every adapter in host memory
    finally:
        server.stop()
