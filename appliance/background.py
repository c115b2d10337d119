"""A coroutine run as a task for as long as a block runs: the daemon's periodic work (ledger
flushes, policy reloads, key revocations, retention, the loop-lag ticker) each has one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, Any], name: str | None = None) -> AsyncIterator[None]:
    """`work` as a task while the block runs; cancelled, and waited for, when it ends (a write the
    task had handed to another thread finishes there first)."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
