"""Weighted fair scheduling on the real engine: a flooding tenant leaves the other its share, and
weights 2:1 give 2:1 service when both are backlogged.

One dedicated server for the module, with `max_running = 2` so that two requests saturate the
engine and the rest wait in the fair queue (README, "Fair scheduling"). Service is measured as the
counters measure it, prompt + 2 x completion tokens, from the usage ledger: the rows of requests
that ended while both tenants were sending (the server's view: a client process the busy machine
is slow to schedule reads its answers late, but its requests waiting at the server are served all
the same). Each tenant's clients run in a process of their own.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from appliance.api.adminclient import AdminClient
from appliance.tenancy.store import Store
from appliance.testing.tenantload import LoadProcess
from tests.conftest import Demo, Server
from tests.dedicated import start_dedicated

MAX_RUNNING = 2
PROMPT = "Once upon a time"
MAX_TOKENS = 192  # long enough that a client's turnaround is small beside a request's turn in the engine
WARM_UP_S = 4.0  # until every client process is sending and both queues are long
RUN_S = WARM_UP_S + 12.0


@pytest.fixture(scope="module")
def fair_server(demo: Demo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_dedicated(demo, tmp_path_factory.mktemp("fair"), max_running=MAX_RUNNING)
    yield server
    server.local.stop()


def tenant(server: Server, name: str, **policy: object) -> str:
    """A fresh tenant allowed the base model, with `policy`; its key."""
    with Store.open(server.demo.database) as store:
        store.add_tenant(name, allow_base_model=True)
        key = store.issue_key(name).plaintext
    AdminClient(server.demo.dir / "state" / "admin.sock").call(
        "POST", f"/admin/tenants/{name}/policy", policy
    )
    return key


def serve(server: Server, concurrency: dict[str, int], keys: dict[str, str]) -> dict[str, int]:
    """Each tenant's clients, in a process of their own, send back to back for RUN_S seconds; the
    service each tenant got from WARM_UP_S on, as the ledger booked it."""
    start_at = time.time() + 3  # time for every load process to start
    loads = [
        LoadProcess(server.url, keys[name], clients, start_at, RUN_S, prompt=PROMPT, max_tokens=MAX_TOKENS)
        for name, clients in concurrency.items()
    ]
    for load in loads:
        load.result()
    return {name: service(server, name, start_at + WARM_UP_S, start_at + RUN_S) for name in concurrency}


def service(server: Server, tenant: str, since: float, until: float) -> int:
    """prompt + 2 x completion tokens of the tenant's requests that ended between the two times."""
    stamps = [datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") for t in (since, until)]
    with sqlite3.connect(server.demo.database) as db:
        (cost,) = db.execute(
            "select coalesce(sum(prompt_tokens + 2 * completion_tokens), 0) from usage "
            "where tenant = ? and ts >= ? and ts < ?",
            [tenant, *stamps],
        ).fetchone()
    return int(cost)


def test_a_flood_at_ten_times_the_concurrency_leaves_the_other_tenant_its_share(fair_server: Server) -> None:
    # B keeps 12 requests out, far more than its share of one of the two places, so that it always
    # has some waiting at the server, however late its client is with the next; A sends ten times
    # as many at once (its queue bound raised to hold them).
    keys = {"flood": tenant(fair_server, "flood", max_queued=1000), "steady": tenant(fair_server, "steady")}
    served = serve(fair_server, {"steady": 12, "flood": 120}, keys)
    flood, steady = served["flood"], served["steady"]
    with sqlite3.connect(fair_server.demo.database) as db:
        (largest,) = db.execute(  # one request's cost, U
            "select max(prompt_tokens + 2 * completion_tokens) from usage where tenant = 'steady'"
        ).fetchone()
    # The documented bound (max_running requests' cost), plus as much again at each end of the
    # window for the requests that were running across it.
    bound = 3 * (MAX_RUNNING + 1) * largest
    assert abs(flood - steady) <= bound, (flood, steady, bound)  # FIFO would give B 12 of every 132


def test_weights_two_to_one_give_two_to_one_service_when_both_are_backlogged(fair_server: Server) -> None:
    keys = {"heavy": tenant(fair_server, "heavy", weight=2), "light": tenant(fair_server, "light", weight=1)}
    served = serve(fair_server, {"heavy": 24, "light": 24}, keys)
    heavy, light = served["heavy"], served["light"]
    assert heavy / light == pytest.approx(2.0, rel=0.15), (heavy, light)
