"""Another program holds the state database's write lock (the `sqlite3` shell with BEGIN IMMEDIATE,
as an operator's session or a backup would) while two tenants send: they are served at the same
pace, an admin write answers "busy, retry" without holding the event loop, and a daemon killed
with SIGKILL meanwhile has booked every response it completed once it is back. On the same box:
what the API port and a plain local user can learn of the tenants.

One daemon (llama.cpp), started twice: before and after the kill."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.api.adminclient import AdminClient, AdminError
from appliance.tenancy.store import BUSY_TIMEOUT_MS
from appliance.testing.localserver import LocalServer, http_status
from tests.conftest import Demo
from tests.ledgerbox import Clients, ForeignLock, open_box, p50, start, usage_rows

TENANTS = ("acme", "globex")
MAX_TOKENS = 64  # about 0.1 s a request here: the ledger's write would be a visible share of it
EACH = 15  # answers per tenant per phase, for the median
NOBODY = 65534


@pytest.fixture(scope="module")
def box(demo: Demo) -> Iterator[Demo]:
    with open_box(demo) as own:
        yield own


@pytest.fixture(scope="module")
def killed_under_lock(box: Demo) -> Iterator[tuple[Clients, list[str]]]:
    """The scenario, run once: two tenants' clients before, during and after a foreign write lock,
    an admin write during it, then a second lock and SIGKILL. Yields the clients (every answer)
    and what the admin write met (for the tests below)."""
    server = start(box)
    admin = AdminClient(box.dir / "state" / "admin.sock")
    clients = Clients(server.url, {t: box.keys[t] for t in TENANTS}, MAX_TOKENS)
    seen: list[str] = []
    try:
        clients.start()
        clients.wait_for("before", EACH)
        with ForeignLock(box.database):
            clients.resume("locked")
            clients.wait_for("locked", EACH)
            clients.pause()
            seen += _admin_write_under_lock(admin)
        clients.resume("after")
        clients.wait_for("after", EACH)
        with ForeignLock(box.database):
            clients.resume("killed")
            clients.wait_for("killed", 3)
            clients.pause()  # nothing in flight: every request sent has its whole answer
            assert _metric(server, "lorabox_usage_spooled_rows") > 0  # the lock did send rows there
            server.kill()
        clients.stop()
        yield clients, seen
    finally:
        clients.stop()
        server.kill()


def _metric(server: LocalServer, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


def _admin_write_under_lock(admin: AdminClient) -> list[str]:
    stalls = admin.call("GET", "/admin/status")["loop_lag"]["stalls"]
    with pytest.raises(AdminError) as refused:
        admin.call("POST", "/admin/tenants/acme/policy", {"rpm": 12345})
    lag = admin.call("GET", "/admin/status")["loop_lag"]
    return [
        f"status {refused.value.status}",
        str(refused.value),
        f"stalls {lag['stalls'] - stalls}",
        f"rpm {admin.call('GET', '/admin/tenants/acme/policy')['policy']['rpm']}",
    ]


def test_a_foreign_write_lock_does_not_slow_any_tenant(killed_under_lock: tuple[Clients, list[str]]):
    clients, _ = killed_under_lock
    for tenant in TENANTS:
        ok = [a for a in clients.answers if a.tenant == tenant and a.completed]
        before = p50([a for a in ok if a.phase == "before"])
        after = p50([a for a in ok if a.phase == "after"])
        locked = p50([a for a in ok if a.phase == "locked"])
        shown = ", ".join(
            f"{p * 1000:.0f} ms {name}"
            for p, name in ((before, "before"), (locked, "locked"), (after, "after"))
        )
        print(f"{tenant}: p50 {shown} ({locked / max(before, after):.2f}x)")
        # What a ledger that waits for the lock adds to every response: SQLite's busy timeout (the
        # old ledger waited it out on every write, then failed). The bound is half of that, not a
        # ratio to the phases around it: the machine's load moves a 0.1 s request's median by
        # 2-3x between phases here (CI saw 120 -> 283 -> 125 ms), never by seconds.
        added = locked - max(before, after)
        assert added < BUSY_TIMEOUT_MS / 1000 / 2, (tenant, before, locked, after)
    refused = [a for a in clients.answers if not a.completed]
    assert refused == [], refused


def test_an_admin_write_under_the_lock_is_busy_retry_and_holds_no_one(killed_under_lock):
    _, seen = killed_under_lock
    status, message, stalls, rpm = seen
    assert status == "status 503", seen
    assert "busy" in message, seen
    assert "retry" in message, seen
    assert stalls == "stalls 0", seen  # the event loop was never 100 ms late meanwhile
    assert rpm == "rpm None", seen  # and nothing was changed


def test_every_completed_response_has_exactly_one_row_after_a_kill_under_the_lock(
    box: Demo, killed_under_lock: tuple[Clients, list[str]]
):
    clients, _ = killed_under_lock
    server = start(box)  # the lock is gone: the spool is replayed at start
    try:
        rows = usage_rows(box.database)
        for tenant in TENANTS:
            answered = [a for a in clients.answers if a.tenant == tenant and a.completed]
            booked = [r for r in rows if r["tenant"] == tenant]
            assert len(booked) == len(answered), tenant  # every answer once: none lost, none twice
            assert sum(r["completion_tokens"] for r in booked) == sum(a.completion_tokens for a in answered)
        assert len({r["uid"] for r in rows}) == len(rows)
        assert list((box.dir / "state" / "spool").glob("*.jsonl")) == []
        _check_what_outsiders_see(box, server)
    finally:
        server.stop()


def _check_what_outsiders_see(box: Demo, server: LocalServer) -> None:
    """On the daemon that is back: the API port tells no one the tenants; a plain local user reads
    nothing of the state, the keys or an export."""
    for path in ("/metrics", "/admin/status", "/admin/tenants", "/"):
        assert http_status(f"{server.url}{path}") == 404, path
    import urllib.error
    import urllib.request

    shown = []
    for path in ("/healthz", "/readyz", "/v1/models", "/metrics"):
        try:
            with urllib.request.urlopen(f"{server.url}{path}", timeout=10) as response:  # noqa: S310
                shown.append(response.read().decode())
        except urllib.error.HTTPError as exc:
            shown.append(exc.read().decode())
    for text in shown:
        for secret in (*TENANTS, "initech", "v1", "lorabox_requests_total"):
            assert secret not in text, (secret, text)
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:  # noqa: S310
        assert 'tenant="acme"' in response.read().decode()  # the operator's listener has them

    admin = AdminClient(box.dir / "state" / "admin.sock", timeout_s=300)
    export = admin.call("POST", "/admin/tenants/acme/export", {"name": "acme-outsider.gguf"})
    exported = Path(export["path"])
    assert exported.parent == box.dir / "state" / "exports"
    private = [
        box.dir / "state",
        box.database,
        Path(f"{box.database}-wal"),
        Path(f"{box.database}-shm"),
        exported,
        box.dir / "state" / "exports",
        box.dir / "keys.json",
    ]
    assert _readable_by_nobody(private) == []
    # Each file on its own too, should its folder ever be opened to everyone.
    for folder in (box.dir / "state", box.dir / "state" / "exports"):
        os.chmod(folder, 0o755)  # noqa: S103 (what if someone opened it)
    try:
        assert _readable_by_nobody([box.database, Path(f"{box.database}-wal"), exported]) == []
    finally:
        for folder in (box.dir / "state", box.dir / "state" / "exports"):
            os.chmod(folder, 0o750)  # noqa: S103 (as lorabox keeps it)
    audit = admin.call("GET", "/admin/audit?tenant=acme")["audit"]
    [row] = [r for r in audit if r["action"] == "export"]
    after = json.loads(row["after"])
    assert (after["name"], after["version"], after["size_bytes"]) == (
        "acme-outsider.gguf",
        "v1",
        export["size_bytes"],
    )
    assert after["sha256"] == export["sha256"]
    assert row["actor"]


def _readable_by_nobody(paths: list[Path]) -> list[str]:
    """Which of `paths` user `nobody` (in no group of ours) can read, or list."""
    probe = (
        'for p; do if [ -d "$p" ]; then ls "$p"; else head -c1 "$p"; fi >/dev/null 2>&1 && echo "$p"; done'
        "; exit 0"
    )
    assert os.getuid() == 0, "run as root: the test becomes user nobody"
    for path in paths:
        assert path.exists(), path
    done = subprocess.run(
        ["/bin/sh", "-c", probe, "probe", *map(str, paths)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [line for line in done.stdout.splitlines() if line]
