"""The state database's disk full (a 2 MB tmpfs, filled to the last byte): every response the box
completes has a durable row, booked exactly once when space returns, across SIGKILL and SIGTERM;
where the spool has no room either, the box refuses (503, /readyz says why) rather than serve a
request it cannot bill; `lorabox doctor` reports the full disk.

The spool is on a second small tmpfs (`usage_spool_dir`), filled in its turn. One daemon
(llama.cpp), started three times."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from appliance.config.settings import load_config
from appliance.ops import doctor
from appliance.testing.localserver import LocalServer
from tests.conftest import Demo
from tests.ledgerbox import Answer, ask, fill, open_box, start, usage_rows

TENANTS = ("acme", "globex")
MAX_TOKENS = 16
MAX_TRIES = 60  # requests sent at most until the box refuses (the first whose row fails)


@dataclass
class Scenario:
    box: Demo
    server: LocalServer | None = None
    answers: list[Answer] = field(default_factory=list)

    def send(self, phase: str, rounds: int) -> list[Answer]:
        assert self.server is not None
        sent = [
            ask(self.server.url, self.box.keys[t], t, phase, MAX_TOKENS, stream=i % 2 == 0)
            for i in range(rounds)
            for t in TENANTS
        ]
        self.answers += sent
        return sent

    def booked_exactly_the_completed_answers(self) -> None:
        rows = usage_rows(self.box.database)
        for tenant in TENANTS:
            completed = [a for a in self.answers if a.tenant == tenant and a.completed]
            booked = [r for r in rows if r["tenant"] == tenant]
            assert len(booked) == len(completed), tenant
            assert sum(r["completion_tokens"] for r in booked) == sum(a.completion_tokens for a in completed)
        assert len({r["uid"] for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def scenario(demo: Demo) -> Iterator[Scenario]:
    settings = {"usage_spool_dir": "{dir}/spool"}
    with open_box(demo, settings, mounts={"state": "2m", "spool": "256k"}) as box:
        run = Scenario(box, start(box))
        try:
            yield run
        finally:
            if run.server is not None:
                run.server.kill()


def readyz(server: LocalServer) -> tuple[int, dict[str, str]]:
    try:
        with urllib.request.urlopen(f"{server.url}/readyz", timeout=30) as response:  # noqa: S310 (loopback)
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def metric(server: LocalServer, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def space_checks(box: Demo) -> list[doctor.Check]:
    checked = doctor.Box(load_config(box.config), box.config, None, doctor.DEFAULT_SERVICE_USER)
    return list(doctor.check_space(checked))


def test_a_full_state_disk_costs_no_answer_and_every_row_is_booked_once_after_sigkill(scenario: Scenario):
    box, server = scenario.box, scenario.server
    assert server is not None
    assert all(a.completed for a in scenario.send("warm", 1))
    filler = fill(box.dir / "state")
    answered = scenario.send("state full", 4)
    assert [a for a in answered if not a.completed] == []  # the spool took every row
    assert readyz(server)[0] == 200
    assert metric(server, "lorabox_usage_spooled_rows") > 0
    assert metric(server, 'lorabox_usage_write_failures_total{target="database"}') > 0
    [state] = [c for c in space_checks(box) if str(box.dir / "state") in c.detail]
    assert state.level == doctor.FAIL, state
    assert "No space left" in state.detail, state
    server.kill()  # SIGKILL, the disk still full
    filler.unlink()
    scenario.server = start(box)  # the spool is booked at start
    scenario.booked_exactly_the_completed_answers()
    assert list((box.dir / "spool").glob("*.jsonl")) == []


def test_with_no_room_for_the_spool_either_the_box_refuses_and_never_completes_an_unbooked_answer(
    scenario: Scenario,
):
    box, server = scenario.box, scenario.server
    assert server is not None
    fillers = [fill(box.dir / "state"), fill(box.dir / "spool")]
    refused: list[Answer] = []
    for _ in range(MAX_TRIES // len(TENANTS)):
        refused = [a for a in scenario.send("both full", 1) if not a.completed]
        if refused:
            break
    assert refused, "every answer completed with neither the database nor the spool taking rows"
    assert {a.code for a in refused} == {"usage_ledger_unavailable"}, refused
    status, body = readyz(server)
    assert (status, body["status"]) == (503, "refusing"), body
    assert "No space left" in body["reason"], body
    [later] = scenario.send("refusing", 1)[:1]
    assert (later.status, later.code) == (503, "usage_ledger_unavailable")
    assert {c.level for c in space_checks(box)} == {doctor.FAIL}
    server.stop()  # SIGTERM: what it could not write, it says
    log = Path(server.log_path).read_text()
    assert "could not be written anywhere and are lost" in log
    for filler in fillers:
        filler.unlink()
    scenario.server = start(box)
    scenario.booked_exactly_the_completed_answers()
    assert readyz(scenario.server)[0] == 200
