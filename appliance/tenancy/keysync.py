"""Key revocations across boxes, through the Redis of the shared limits (`limits_backend`).

Every box writes the keys revoked in its database to one Redis hash (key id -> when), and revokes
here those revoked elsewhere, with the time they were revoked there. A key revoked on any box (by
`lorabox key revoke`, the admin API, the TUI or `lorabox fleet import`) is refused by every box
that shares the Redis within 2 x EVERY_S (one round to write it, one to read it). A revocation is
never undone, so the boxes cannot disagree for long whatever order they hear things in. Without
Redis, revocations travel with `lorabox fleet import` (fleet.py).

Reads of this box's database use the event loop's (read-only) connection: one indexed query a
round. Revoking goes through the writer thread, like every other write of the daemon.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from .. import background
from ..errors import LoraboxError
from .redislimits import PREFIX
from .store import Store
from .writer import StoreWriter

log = logging.getLogger(__name__)

EVERY_S = 1.0
REVOKED = f"{PREFIX}:revoked"
ACTOR = "fleet (revoked on another box)"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RevocationSync:
    def __init__(self, client: Any, store: Store, writer: StoreWriter, every_s: float = EVERY_S):
        self.client, self.store, self.writer, self.every_s = client, store, writer, every_s
        self._shared: set[str] = set()  # revoked here and known to be in Redis
        self._seen: tuple[int, int, int] | None = None  # what the last full read was made of

    def _revoked_here(self) -> dict[str, str]:
        rows = self.store.db.execute(
            "select key_id, revoked_at from api_keys where revoked_at is not null "
            "union all select key_id, revoked_at from service_keys where revoked_at is not null"
        ).fetchall()
        return {str(key_id): str(at) for key_id, at in rows}

    async def round(self) -> list[str]:
        """One exchange with Redis; returns the key ids revoked here because of it."""
        here = self._revoked_here()
        new = {key_id: at for key_id, at in here.items() if key_id not in self._shared}
        if new:
            pipe = self.client.pipeline(transaction=False)
            for key_id, at in new.items():
                pipe.hsetnx(REVOKED, key_id, at)
            await pipe.execute()
            self._shared.update(new)
        known = {
            str(row[0])
            for row in self.store.db.execute(
                "select key_id from api_keys union all select key_id from service_keys"
            ).fetchall()
        }
        # Read in full only when something changed: revoked elsewhere, or a key new here (imported).
        seen = (int(await self.client.hlen(REVOKED)), len(known), len(here))
        if seen == self._seen:
            return []
        everywhere = {_text(k): _text(v) for k, v in (await self.client.hgetall(REVOKED)).items()}
        self._seen = seen
        revoked = []
        for key_id, at in everywhere.items():
            if key_id in here or key_id not in known:
                continue
            try:
                await self.writer.call(Store.revoke_key, key_id, actor=ACTOR, revoked_at=at)
            except LoraboxError as exc:  # busy or full: the next round tries again
                log.warning("key %s revoked on another box, not here yet: %s", key_id, exc)
                self._seen = None
                continue
            log.info("key %s revoked: it was revoked on another box at %s", key_id, at)
            revoked.append(key_id)
        return revoked

    async def running(self) -> AsyncIterator[None]:
        """aiohttp cleanup context: a round every `every_s` while the daemon serves."""

        async def loop() -> None:
            while True:
                try:
                    async with asyncio.timeout(max(5.0, self.every_s * 5)):
                        await self.round()
                except Exception as exc:  # Redis away: the limits backend says so in the log
                    log.debug("key revocations not exchanged this round: %s", exc)
                await asyncio.sleep(self.every_s)

        async with background.running(loop()):
            yield
