"""A small client for the admin API's JSON over its Unix socket.

Standalone on purpose (aiohttp and the standard library only): the TUI imports this and
nothing else from the daemon's package.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

SUDO_HEADER = "X-Lorabox-Sudo-User"
"""Who ran the client with sudo, sent by root's client so that the audit log names the same actor
whether a command goes through the socket or writes the database itself (only root's is believed)."""

# One SSE line (a whole stats tick is one `data:` line) may be large with many tenants, but a
# stream that never sends a newline must not grow without bound.
MAX_SSE_LINE_BYTES = 16 << 20


class AdminUnavailable(ConnectionError):
    """The daemon is not running, or this user may not open its admin socket."""


class AdminError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None

    def json(self) -> Any:
        """The data as JSON; AdminError when the daemon sent something else."""
        return _decode(200, self.data.encode())


def _decode(status: int, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdminError(status, f"the daemon answered with something that is not JSON ({exc})") from exc


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message", payload))
    return str(payload)[:200]


class SSEParser:
    """Server-sent events from byte chunks, split anywhere (the text/event-stream format)."""

    def __init__(self) -> None:
        self._pending = b""
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        if len(self._pending) > MAX_SSE_LINE_BYTES:
            raise AdminError(200, f"an event-stream line over {MAX_SSE_LINE_BYTES} bytes")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if not line:
                if self._data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(self._data), self._id))
                self._event, self._data = "", []
                continue
            if line.startswith(":"):
                continue  # a comment: keep-alive
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._event = value
            elif field == "data":
                self._data.append(value)
            elif field == "id":
                self._id = value
        return events


class AdminClient:
    def __init__(self, socket_path: Path | str, timeout_s: float = 120):
        self.socket_path = Path(socket_path)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def _session(self, timeout: aiohttp.ClientTimeout) -> aiohttp.ClientSession:
        if not self.socket_path.exists():
            raise AdminUnavailable(f"no admin socket at {self.socket_path} (is `lorabox serve` running?)")
        sudo = os.environ.get("SUDO_USER", "") if os.getuid() == 0 else ""
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.socket_path)),
            timeout=timeout,
            headers={SUDO_HEADER: sudo} if sudo.isprintable() and sudo.isascii() and sudo else None,
        )

    def _unavailable(self, exc: BaseException) -> AdminUnavailable:
        return AdminUnavailable(
            f"cannot reach the daemon at {self.socket_path}: {str(exc) or type(exc).__name__}"
        )

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with (
                self._session(self.timeout) as session,
                session.request(method, f"http://lorabox{path}", json=body) as response,
            ):
                raw = await response.read()
        except (aiohttp.ClientError, PermissionError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        payload = _decode(response.status, raw)
        if response.status >= 400:
            raise AdminError(response.status, _error_message(payload))
        return payload

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Blocking form, for the CLI."""
        return asyncio.run(self.request(method, path, body))

    async def stream(self, path: str, idle_timeout_s: float) -> AsyncIterator[ServerSentEvent]:
        """The events of a `text/event-stream` endpoint (`/admin/stream`) until the daemon ends it.

        `idle_timeout_s` bounds the silence between two reads, so a daemon that hangs with the
        connection open is noticed. Errors: AdminError for an HTTP error status, AdminUnavailable
        when the connection fails or breaks.
        """
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout.total, sock_read=idle_timeout_s)
        parser = SSEParser()
        try:
            async with (
                self._session(timeout) as session,
                session.get(f"http://lorabox{path}", headers={"Accept": "text/event-stream"}) as response,
            ):
                if response.status >= 400:
                    raw = await response.read()
                    try:
                        message = _error_message(_decode(response.status, raw))
                    except AdminError:
                        message = raw[:200].decode("utf-8", errors="replace")
                    raise AdminError(response.status, message)
                async for chunk in response.content.iter_any():
                    for event in parser.feed(chunk):
                        yield event
        except (aiohttp.ClientError, PermissionError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
