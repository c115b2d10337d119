"""For the tests that lock or fill a daemon's state database: a demo box of its own (llama.cpp, which
starts fastest), reachable by other local users up to its state folder, so that what they can
read there is up to lorabox; small tmpfs mounts to fill; clients that keep every answer."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.demo.build import init_demo
from appliance.testing.localserver import LocalServer, ServerFailed
from tests.conftest import SERVER_START_TIMEOUT_S, Demo

MODEL = "lorabox-demo"  # the base model: every demo tenant may use it


@contextlib.contextmanager
def open_box(
    demo: Demo, settings: dict[str, str] | None = None, mounts: dict[str, str] | None = None
) -> Iterator[Demo]:
    """A copy of the session demo in a folder of /tmp that every user may enter (0755): only
    lorabox's own modes keep them out of its state. `mounts`: {subfolder: tmpfs size}, mounted
    before the demo is written; `settings` are added to its config ("{dir}": the box's folder)."""
    directory = Path(tempfile.mkdtemp(prefix="lorabox-ledger-", dir="/tmp"))
    os.chmod(directory, 0o755)  # noqa: S103 (the point: others may reach the box's folders)
    mounted: list[Path] = []
    try:
        for name, size in (mounts or {}).items():
            point = directory / name
            point.mkdir()
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                pytest.skip(
                    f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}"
                )
            mounted.append(point)
        shutil.copytree(demo.model_dir, directory / "model")
        shutil.copy2(demo.dir / "model.gguf", directory / "model.gguf")
        own = Demo(directory, init_demo(directory))
        with own.config.open("a") as config:
            config.writelines(
                f'{name} = "{value.format(dir=directory)}"\n' for name, value in (settings or {}).items()
            )
        yield own
    finally:
        for point in mounted:
            subprocess.run(["umount", "-l", str(point)], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def start(box: Demo) -> LocalServer:
    try:
        return LocalServer.start(
            box.config,
            box.dir / "server.log",
            timeout_s=SERVER_START_TIMEOUT_S,
            env={"LORABOX_ENGINE": "llamacpp"},
        )
    except ServerFailed as exc:
        pytest.fail(str(exc))


def usage_rows(database: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(database)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("select * from usage order by id")]


def fill(folder: Path) -> Path:
    """Fill the filesystem under `folder` to the last byte; returns the filler file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        for chunk in (1 << 16, 512, 1):
            try:
                while True:
                    file.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


@dataclass
class Answer:
    tenant: str
    phase: str
    status: int
    seconds: float
    completion_tokens: int = 0
    code: str | None = None  # the error's code, for a refusal or a stream cut in-band
    completed: bool = False  # the whole answer arrived: 200, and for a stream [DONE] after no error


def ask(url: str, key: str, tenant: str, phase: str, max_tokens: int, *, stream: bool = False) -> Answer:
    """One completion read to its end."""
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as response:
        raw = response.read()
    seconds = time.perf_counter() - began
    if response.status_code != 200:
        return Answer(tenant, phase, response.status_code, seconds, code=json.loads(raw)["error"]["code"])
    if not stream:
        tokens = json.loads(raw)["usage"]["completion_tokens"]
        return Answer(tenant, phase, 200, seconds, tokens, completed=True)
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    payloads = [json.loads(e) for e in events if e != "[DONE]"]
    errors = [p["error"] for p in payloads if "error" in p]
    usage = [p["usage"] for p in payloads if p.get("usage")]
    done = events[-1:] == ["[DONE]"] and not errors and bool(usage)
    tokens = usage[0]["completion_tokens"] if usage else 0
    return Answer(tenant, phase, 200, seconds, tokens, errors[0]["code"] if errors else None, done)


@dataclass
class Clients:
    """One client thread per tenant, each sending one request after another, tagged with the phase
    it was sent and answered in (one that spans two phases: "between")."""

    url: str
    keys: dict[str, str]
    max_tokens: int
    phase: str = "before"
    answers: list[Answer] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    _go: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _idle: dict[str, threading.Event] = field(default_factory=dict)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for tenant in self.keys:
            self._idle[tenant] = threading.Event()
            thread = threading.Thread(target=self._run, args=(tenant,), daemon=True)
            thread.start()
            self._threads.append(thread)
        self._go.set()

    def _run(self, tenant: str) -> None:
        try:
            while not self._stop.is_set():
                if not self._go.is_set():
                    self._idle[tenant].set()
                    self._go.wait(0.1)
                    continue
                self._idle[tenant].clear()
                phase = self.phase
                answer = ask(self.url, self.keys[tenant], tenant, phase, self.max_tokens)
                if self.phase != phase:
                    answer.phase = "between"
                self.answers.append(answer)
        except BaseException as exc:
            self.failures.append(exc)
        finally:
            self._idle[tenant].set()

    def pause(self) -> None:
        """Returns once no request is in flight."""
        self._go.clear()
        for idle in self._idle.values():
            assert idle.wait(120), "a request did not end"

    def resume(self, phase: str) -> None:
        self.phase = phase
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self.pause()
        for thread in self._threads:
            thread.join(120)

    def count(self, phase: str) -> dict[str, int]:
        return {
            t: sum(a.tenant == t and a.phase == phase and a.completed for a in self.answers)
            for t in self.keys
        }

    def wait_for(self, phase: str, each: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while min(self.count(phase).values()) < each:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"{phase}: {self.count(phase)} of {each} answers each"
            time.sleep(0.05)


def p50(answers: list[Answer]) -> float:
    times = sorted(a.seconds for a in answers)
    return times[len(times) // 2]


class ForeignLock:
    """The `sqlite3` command-line shell holding the database's write lock (BEGIN IMMEDIATE), as an
    operator's session would, from another process; held once `__enter__` returns."""

    def __init__(self, database: Path):
        self.database = database
        self.shell = subprocess.Popen(
            ["sqlite3", "-bail", str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __enter__(self) -> ForeignLock:
        assert self.shell.stdin is not None
        assert self.shell.stdout is not None
        # Waits its turn behind the daemon's own short writes; says so once it holds the lock (a
        # failed BEGIN ends the shell: -bail).
        self.shell.stdin.write(".timeout 30000\nBEGIN IMMEDIATE;\n.print locked\n")
        self.shell.stdin.flush()
        line = self.shell.stdout.readline()
        assert line.strip() == "locked", (
            f"the sqlite3 shell did not take the lock: {self.shell.stderr.read()}"
        )
        return self

    def __exit__(self, *_: object) -> None:
        assert self.shell.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.shell.stdin.write("ROLLBACK;\n.quit\n")
            self.shell.stdin.close()
        self.shell.wait(30)
