"""Recorded admin-API payloads served on a real Unix socket, for the TUI's tests and benchmark.

A stand-in for the daemon's side of docs/admin-api.md: the same routes and shapes, served by
aiohttp in a thread of its own (so it works under a test's event loop and under `App.run`). It
keeps what the operator does (activate, canary, resident, revoke) in memory, records each POST,
announces it as an event on the stream, and can misbehave on demand (`fault`).

    python -m appliance.testing.adminreplay /tmp/admin.sock [--cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "admin"

# What `fault` makes every read answer (and every stats tick carry).
FAULTS = ("garbage", "500", "empty", "wrong-types")
WRONG_TYPES: dict[str, Any] = {
    "status": {
        "state": 5, "ready": "yes", "engine": ["vllm"], "uptime_s": "long", "pid": 1.5e400,
        "engine_stats": 3, "adapters": [1], "totals": "many",
        "device": {"kind": "gpu", "gpus": [None, 7, {"memory_total": "x"}], "vram_split": [], "host": "big"},
    },
    "tenants": [
        {"name": "odd", "stats": [], "quota": "lots", "canary": 7, "policy": 3, "tier": 1},
        {"name": "odder", "stats": {"errors": [], "history": {"rps": ["a", None, True, 1]}, "e2e_ms": 4}},
        5, None, {"name": 12}, "acme",
    ],
    "events": [{"kind": None}, 3, {"id": "x", "kind": "weird", "ts": 12}],
}  # fmt: skip


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return web.json_response(body, status=status)


class AdminReplay:
    def __init__(self, socket_path: Path | str, fixtures: Path = FIXTURES, status: str = "status_gpu.json"):
        self.socket_path = Path(socket_path)
        load = lambda name: json.loads((fixtures / name).read_text())  # noqa: E731
        self.status: dict[str, Any] = load(status)
        self.tenants: list[dict[str, Any]] = load("tenants.json")["tenants"]
        self.details = {t["name"]: load(f"tenant_{t['name']}.json") for t in self.tenants}
        self.events: list[dict[str, Any]] = load("events.json")["events"]  # newest first
        self.posts: list[tuple[str, Any]] = []
        self.stream_intervals: list[float] = []
        self.fault: str | None = None
        self.stream_enabled = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    # Running it.

    def start(self) -> AdminReplay:
        ready, failure = threading.Event(), []
        self._stopping = asyncio.Event()

        def serve() -> None:
            try:
                asyncio.run(self._serve(ready))
            except Exception as exc:  # reported to start(), which raises it
                failure.append(exc)
                ready.set()

        self._thread = threading.Thread(target=serve, name="admin-replay", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise failure[0]
        return self

    def stop(self, remove_socket: bool = True) -> None:
        """Like a daemon going away: open streams end, connections are refused from now on."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(30)
        self._loop = self._thread = None
        if remove_socket:
            self.socket_path.unlink(missing_ok=True)

    def __enter__(self) -> AdminReplay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        app = web.Application()
        app.router.add_get("/admin/status", self._status)
        app.router.add_get("/admin/tenants", self._tenants)
        app.router.add_get("/admin/tenants/{tenant}", self._tenant)
        app.router.add_get("/admin/events", self._events)
        app.router.add_get("/admin/stream", self._stream)
        app.router.add_post("/admin/tenants/{tenant}/{action}", self._act)
        app.router.add_post("/admin/keys/{key_id}/revoke", self._revoke)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        self.socket_path.unlink(missing_ok=True)
        await web.UnixSite(runner, str(self.socket_path)).start()
        ready.set()
        await self._stopping.wait()
        await runner.cleanup()

    # What the tests do to it.

    def emit(self, kind: str, tenant: str = "", version: str = "", detail: str = "") -> dict[str, Any]:
        """A new event, as the daemon would record and announce it (thread-safe)."""
        event = {
            "id": max((e["id"] for e in self.events), default=0) + 1,
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": kind,
            "tenant": tenant,
            "version": version,
            "detail": detail,
        }
        self.events.insert(0, event)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._announce, event)
        return event

    def _announce(self, event: dict[str, Any]) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    # Reading.

    def _faulty(self, section: str) -> web.Response | None:
        if self.fault == "garbage":
            return web.Response(body=b'{"status": {"state": "rea', content_type="application/json")
        if self.fault == "500":
            return _error(500, "internal error (replayed)")
        if self.fault == "empty":
            return web.json_response({})
        if self.fault == "wrong-types":
            return web.json_response(
                {section: WRONG_TYPES[section]} if section != "status" else WRONG_TYPES[section]
            )
        return None

    def _row(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.tenants if t["name"] == name), None)

    async def _status(self, request: web.Request) -> web.Response:
        return self._faulty("status") or web.json_response(self.status)

    async def _tenants(self, request: web.Request) -> web.Response:
        return self._faulty("tenants") or web.json_response({"tenants": self.tenants})

    async def _tenant(self, request: web.Request) -> web.Response:
        if faulty := self._faulty("tenants"):
            return faulty
        name = request.match_info["tenant"]
        row = self._row(name)
        if row is None:
            return _error(404, f"no tenant named {name!r}")
        return web.json_response(self.details[name] | row)

    async def _events(self, request: web.Request) -> web.Response:
        if faulty := self._faulty("events"):
            return faulty
        limit = int(request.query.get("limit", "100"))
        return web.json_response({"events": self.events[:limit]})

    def _tick(self) -> str:
        if self.fault == "garbage":
            return '{"status": {"state": "rea'
        if self.fault == "500":
            return json.dumps({"error": {"message": "internal error (replayed)"}})
        if self.fault == "empty":
            return "{}"
        if self.fault == "wrong-types":
            return json.dumps({"status": WRONG_TYPES["status"], "tenants": WRONG_TYPES["tenants"]})
        return json.dumps({"status": self.status, "tenants": self.tenants})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self.stream_enabled:
            return _error(404, "not found")
        interval = min(max(float(request.query.get("interval", "2")), 0.5), 60.0)
        self.stream_intervals.append(interval)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while not self._stopping.is_set():
                await response.write(f"event: stats\ndata: {self._tick()}\n\n".encode())
                deadline = asyncio.get_running_loop().time() + interval
                while (
                    left := deadline - asyncio.get_running_loop().time()
                ) > 0 and not self._stopping.is_set():
                    try:
                        event = await asyncio.wait_for(queue.get(), min(left, 0.2))
                    except TimeoutError:
                        continue
                    await response.write(f"event: event\ndata: {json.dumps(event)}\n\n".encode())
        except ConnectionResetError:
            pass
        finally:
            self._subscribers.discard(queue)
        return response

    # Acting.

    async def _act(self, request: web.Request) -> web.Response:
        name, action = request.match_info["tenant"], request.match_info["action"]
        body: dict[str, Any] = await request.json() if request.can_read_body else {}
        self.posts.append((request.path, body))
        row = self._row(name)
        if row is None:
            return _error(404, f"no tenant named {name!r}")
        if action == "activate":
            row["pinned_version"] = body["version"]
            row["active_version"] = body["version"] or row["active_version"]
            self.emit(
                "adapter_pinned" if body["version"] else "adapter_unpinned", name, body["version"] or ""
            )
            return web.json_response(
                {"tenant": name, "active": row["active_version"], "pinned": body["version"]}
            )
        if action == "canary":
            row["canary"] = (
                {"version": body["version"], "percent": body["percent"]} if body["percent"] else None
            )
            self.emit("canary_set" if row["canary"] else "canary_cleared", name, body["version"] or "")
            return web.json_response({"tenant": name, "canary": row["canary"]})
        if action == "resident":
            row["keep_resident"] = body["keep"]
            self.emit("residency_kept" if body["keep"] else "residency_released", name)
            pinned = row["active_version"] if body["keep"] else None
            return web.json_response(
                {"tenant": name, "keep_resident": body["keep"], "pinned_version": pinned}
            )
        return _error(404, f"no action {action!r}")

    async def _revoke(self, request: web.Request) -> web.Response:
        key_id = request.match_info["key_id"]
        self.posts.append((request.path, await request.json() if request.can_read_body else None))
        for name, detail in self.details.items():
            for key in detail["keys"]:
                if key["key_id"] == key_id and key["revoked_at"] is None:
                    key["revoked_at"] = datetime.now(UTC).isoformat(timespec="seconds")
                    self.emit("key_revoked", name, detail=key_id)
                    return web.json_response(
                        {"key_id": key_id, "tenant": name, "revoked_at": key["revoked_at"]}
                    )
        return _error(404, f"no active key {key_id!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("socket", type=Path)
    parser.add_argument("--cpu", action="store_true", help="a CPU-only box (status_cpu.json)")
    parser.add_argument("--fixtures", type=Path, default=FIXTURES)
    args = parser.parse_args()
    replay = AdminReplay(args.socket, args.fixtures, "status_cpu.json" if args.cpu else "status_gpu.json")
    replay.start()
    print(f"replaying {args.fixtures} on {args.socket}; Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        replay.stop()


if __name__ == "__main__":
    main()
