"""`lorabox status` and `lorabox ps` as text, from the admin API's example payloads."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.ops.report import ps_rows, ps_text, status_text

FIXTURES = Path(__file__).parent / "fixtures" / "admin"


def load(name: str) -> dict:  # type: ignore[type-arg]
    loaded: dict = json.loads((FIXTURES / name).read_text())  # type: ignore[type-arg]
    return loaded


def test_status_on_a_gpu_box_shows_each_gpu_and_the_vram_split() -> None:
    text = status_text(load("status_gpu.json"), load("tenants.json")["tenants"])
    assert "GPU 0    NVIDIA GeForce RTX 4090: VRAM 20.0 GiB / 24.0 GiB (lorabox 19.5 GiB), util 87%" in text
    assert "64 °C, 302 W / 450 W" in text
    assert "VRAM     base weights 15.0 GiB, kv cache 3.0 GiB, adapter slots 512.0 MiB, other 1.5 GiB" in text
    assert (
        "engine   8 running, 3 waiting, KV cache 31% used, 4 adapter slots; adapters 5 gpu / 1 cpu / 1 disk"
        in text
    )
    acme = next(line for line in text.splitlines() if line.startswith("acme "))
    assert acme.split()[:6] == ["acme", "v2", "gpu", "812", "40211", "20110"]
    assert acme.split()[-1] == "24%"


def test_status_on_a_cpu_box_says_cpu_only_and_unknowns_are_na() -> None:
    status = load("status_cpu.json")
    status["engine_stats"] = None
    status["device"]["host"]["cpu_pct"] = None
    text = status_text(status, [{"name": "quiet", "stats": {}, "quota": None}])
    assert "device   CPU only: N/A of 2 cores, host memory 9.0 GiB / 24.0 GiB" in text
    assert "engine   N/A running, N/A waiting, KV cache N/A used" in text
    assert "quiet" in text.splitlines()[-1]


def test_ps_says_how_long_each_adapter_has_been_idle() -> None:
    rows = ps_rows(
        [
            {"tenant": "acme", "version": "v2", "tier": "gpu", "pinned": True, "last_used": 1000.0,
             "size_bytes": 2621440, "running": 0},
            {"tenant": "globex", "version": "v1", "tier": "cpu", "pinned": False, "last_used": 1000.0,
             "size_bytes": 1024, "running": 2},
            {"tenant": "hooli", "version": "v1", "tier": "disk", "pinned": False, "last_used": None,
             "size_bytes": 10, "running": 0},
        ]
    )  # fmt: skip
    assert [r["idle_since"] for r in rows] == ["1970-01-01T00:16:40+00:00", None, None]
    lines = ps_text(rows, now=1000.0 + 3725).splitlines()
    assert lines[0].split() == ["TENANT", "VERSION", "SIZE", "TIER", "PINNED", "IDLE", "SINCE"]
    assert lines[1].split() == ["acme", "v2", "2.5", "MiB", "gpu", "pinned", "1h", "2m", "ago"]
    assert lines[2].split()[-3:] == ["busy", "(2", "running)"]
    assert lines[3].split()[-2:] == ["never", "used"]


def test_status_says_when_usage_rows_wait_and_why_requests_are_refused() -> None:
    status = load("status_cpu.json")
    assert "ledger" not in status_text(status, [])  # nothing waiting: no line
    status["state"], status["reason"] = "refusing", "usage ledger unavailable: the disk is full"
    status["ledger"] = {
        "pending_rows": 3,
        "spooled_rows": 120,
        "write_failures": {"database": 41, "spool": 2},
        "dropped_rows": 0,
        "unavailable": "the disk is full",
        "spool_dir": "/var/lib/lorabox/spool",
    }
    lines = status_text(status, []).splitlines()
    assert "refusing (usage ledger unavailable: the disk is full)" in lines[0]
    assert (
        "ledger   3 usage rows pending, 120 in the spool /var/lib/lorabox/spool; "
        "failed writes: 41 database, 2 spool" in lines
    )
    assert "         refusing requests: the disk is full" in lines


def test_status_warns_when_llamacpp_serves_in_vllms_place() -> None:
    status = load("status_cpu.json") | {"engine": "llamacpp", "engine_fallback": "libnuma.so.1 is missing"}
    assert "WARNING  not vLLM: libnuma.so.1 is missing" in status_text(status, []).splitlines()
    assert "WARNING" not in status_text(load("status_cpu.json"), [])


def test_status_shows_a_tenants_batch_lines_beside_its_requests() -> None:
    """RUN and QUEUE: the interactive requests, then `+N` for the background band's (batch lines,
    flex requests); a tenant without any shows the plain count."""
    tenants = [
        {
            "name": "acme",
            "stats": {"running": 2, "queued": 0, "background_running": 6, "background_queued": 1},
        },
        {"name": "globex", "stats": {"running": 1, "queued": 0, "background_running": 0}},
    ]
    lines = status_text(load("status_cpu.json"), tenants).splitlines()
    header = next(line for line in lines if line.startswith("TENANT"))
    run, queue = header.index("RUN"), header.index("QUEUE")
    acme = next(line for line in lines if line.startswith("acme "))
    globex = next(line for line in lines if line.startswith("globex "))
    assert (acme[run:].split()[0], acme[queue:].split()[0]) == ("2+6", "0+1")
    assert (globex[run:].split()[0], globex[queue:].split()[0]) == ("1", "0")
