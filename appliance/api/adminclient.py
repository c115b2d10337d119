"""A small client for the admin API's JSON over its Unix socket.

Standalone on purpose (aiohttp and the standard library only): the TUI imports this and
nothing else from the daemon's package.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp


class AdminUnavailable(ConnectionError):
    """The daemon is not running, or this user may not open its admin socket."""


class AdminError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class AdminClient:
    def __init__(self, socket_path: Path | str, timeout_s: float = 120):
        self.socket_path = Path(socket_path)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        if not self.socket_path.exists():
            raise AdminUnavailable(f"no admin socket at {self.socket_path} (is `lorabox serve` running?)")
        try:
            connector = aiohttp.UnixConnector(path=str(self.socket_path))
            async with (
                aiohttp.ClientSession(connector=connector, timeout=self.timeout) as session,
                session.request(method, f"http://lorabox{path}", json=body) as response,
            ):
                payload = await response.json(content_type=None)
        except (aiohttp.ClientConnectionError, PermissionError) as exc:
            raise AdminUnavailable(f"cannot reach the daemon at {self.socket_path}: {exc}") from exc
        if response.status >= 400:
            raise AdminError(response.status, payload.get("error", {}).get("message", str(payload)))
        return payload

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Blocking form, for the CLI."""
        return asyncio.run(self.request(method, path, body))
