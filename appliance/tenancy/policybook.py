"""The daemon's view of every tenant's policy: in memory, so a request never waits on the disk.

The admin API updates it as it saves a change (the CLI goes through the admin API while the
daemon runs), so a change applies to the very next request. A change written to the database
by other means (the CLI when it cannot reach the daemon's socket) is picked up by `follow`,
which checks the policies table every `every_s` on a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import background
from .policy import Policy, effective
from .store import Store

log = logging.getLogger(__name__)

FOLLOW_EVERY_S = 2.0


class PolicyBook:
    def __init__(self, defaults: Policy, values: dict[str, dict[str, Any]]):
        self.defaults = defaults
        self._values = values
        self._effective: dict[str, Policy] = {}
        self._updates = 0  # so that a reload read before an update does not undo it

    @classmethod
    def load(cls, store: Store, defaults: Policy) -> PolicyBook:
        return cls(defaults, store.all_policy_values())

    def get(self, tenant: str) -> Policy:
        policy = self._effective.get(tenant)
        if policy is None:
            policy = self._effective[tenant] = effective(self.defaults, self._values.get(tenant, {}))
        return policy

    def own(self, tenant: str) -> dict[str, Any]:
        """The tenant's own values (the rest follow the defaults)."""
        return dict(self._values.get(tenant, {}))

    def update(self, tenant: str, values: dict[str, Any]) -> None:
        self._values[tenant] = values
        self._effective.pop(tenant, None)
        self._updates += 1

    def replace_all(self, values: dict[str, dict[str, Any]]) -> None:
        if values != self._values:
            self._values = values
            self._effective.clear()

    async def follow(self, database: Path, every_s: float = FOLLOW_EVERY_S) -> AsyncIterator[None]:
        """aiohttp cleanup context: reload the policies when the table changed behind our back."""
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabox-policies")
        connection: list[Store] = []  # opened and used on the reader thread only
        marker: tuple[int, str] | None = None

        def changed() -> dict[str, dict[str, Any]] | None:
            nonlocal marker
            if not connection:
                connection.append(Store.connect(database))
            store = connection[0]
            now = store.policy_marker()
            if now == marker:
                return None
            marker = now
            return store.all_policy_values()

        def forget_marker() -> None:
            nonlocal marker
            marker = None

        async def loop() -> None:
            while True:
                updates = self._updates
                try:
                    values = await asyncio.get_running_loop().run_in_executor(reader, changed)
                except Exception:
                    log.exception("could not read the tenant policies; keeping those in memory")
                else:
                    if values is not None and updates == self._updates:
                        self.replace_all(values)
                    elif values is not None:
                        forget_marker()  # read again next time
                await asyncio.sleep(every_s)

        async with background.running(loop()):
            yield
        if connection:
            await asyncio.get_running_loop().run_in_executor(reader, connection[0].db.close)
        reader.shutdown()
