"""For tests that kill, stop or hang a server: a dedicated `lorabox serve` on its own copy of the
demo (own state, keys and usage ledger), and a reader that keeps every SSE event of a stream."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer, ServerFailed
from tests.conftest import SERVER_START_TIMEOUT_S, Demo, Server


def start_dedicated(demo: Demo, directory: Path, **settings: float) -> Server:
    """A server on a copy of the session demo's model, with `settings` added to its config."""
    shutil.copytree(demo.model_dir, directory / "model")
    own = Demo(directory, init_demo(directory))
    with own.config.open("a") as config:
        config.writelines(f"{name} = {value!r}\n" for name, value in settings.items())
    try:
        running = LocalServer.start(own.config, directory / "server.log", timeout_s=SERVER_START_TIMEOUT_S)
    except ServerFailed as exc:
        pytest.fail(str(exc))
    return Server(running, own)


def engine_core(server: Server) -> psutil.Process:
    """vLLM's engine-core process: a child of the daemon."""
    for child in psutil.Process(server.local.process.pid).children():
        if "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("the daemon has no engine-core child process")


def usage_rows(demo: Demo) -> list[dict[str, Any]]:
    with sqlite3.connect(demo.database) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("select * from usage order by id")]


class StreamReader(threading.Thread):
    """One streamed /v1/completions request, read to its end in a thread; keeps every event."""

    def __init__(self, server: Server, key: str, **body: Any):
        super().__init__(daemon=True)
        self.request = urllib.request.Request(  # noqa: S310 (loopback only)
            f"{server.url}/v1/completions",
            data=json.dumps({"stream": True, **body}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        self.events: list[Any] = []  # each event's JSON, or the string "[DONE]"
        self.first_text = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with urllib.request.urlopen(self.request, timeout=120) as response:  # noqa: S310
                for line in response:
                    if line.startswith(b"data: "):
                        data = line.removeprefix(b"data: ").strip()
                        self.events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
                        if self.texts:
                            self.first_text.set()
        except Exception as exc:
            self.failure = exc

    @property
    def texts(self) -> list[str]:
        return [e["choices"][0]["text"] for e in self.events if isinstance(e, dict) and e.get("choices")]

    @property
    def error(self) -> dict[str, Any] | None:
        """The in-band error event's `error` object, if the stream got one."""
        errors = [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]
        return errors[0] if errors else None

    @property
    def finished(self) -> bool:
        """Ended as a complete stream: a finish_reason, then [DONE], and no error."""
        reasons = [
            e["choices"][0]["finish_reason"] for e in self.events if isinstance(e, dict) and e.get("choices")
        ]
        return (
            self.events[-1:] == ["[DONE]"]
            and self.error is None
            and bool(reasons)
            and reasons[-1] is not None
        )

    @property
    def cut_with(self) -> str | None:
        """The error code, when the stream ended with an error event followed by [DONE]."""
        if len(self.events) >= 2 and self.events[-1] == "[DONE]" and self.error is not None:
            return str(self.error["code"]) if self.events[-2] == {"error": self.error} else None
        return None
