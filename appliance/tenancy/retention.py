"""Retention: a tenant's ledger rows older than its `retention_days` go, their totals stay.

Before rows are deleted, what `lorabox usage` reports of them (requests, prompt and completion
tokens, cost at the prices they were served at, per month, box and tier) is added to `usage_monthly`,
in the same transaction; `Store.usage_report` adds those rows back, so the totals of a closed
period, and the bill, are what they were. What is lost is the detail: single rows, and days
(`--by day` shows a summarised month on its first day).

The daemon runs it once a day (RETENTION_EVERY_S) on its writer thread; `retention_days` unset
(the default) keeps every row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

from .. import background
from ..errors import LoraboxError
from .quota import timestamp
from .store import Store
from .writer import StoreWriter

log = logging.getLogger(__name__)

RETENTION_EVERY_S = 24 * 3600.0


def apply(store: Store, days_of: Callable[[str], int | None], now: datetime | None = None) -> dict[str, int]:
    """Summarise, then delete, each tenant's rows older than its retention days (`days_of`: None
    keeps them all); rows deleted per tenant. A removed tenant's rows (kept under its archived
    name) follow the defaults."""
    now = now or datetime.now(UTC)
    deleted: dict[str, int] = {}
    with store.writing():
        tenants = [str(t) for (t,) in store.db.execute("select distinct tenant from usage")]
        retention = {t: days for t in tenants if (days := days_of(t)) is not None}
        for tenant, days in sorted(retention.items()):
            cutoff = timestamp(now - timedelta(days=days))
            store.db.execute(
                "insert into usage_monthly (tenant, month, box_id, tier, requests, prompt_tokens, "
                "completion_tokens, cost) "
                "select tenant, substr(ts, 1, 7), coalesce(box_id, ''), coalesce(tier, 'default'), count(*), "
                "sum(prompt_tokens), sum(completion_tokens), sum(prompt_tokens * coalesce(price_in, 0) "
                "+ completion_tokens * coalesce(price_out, 0)) / 1e6 "
                "from usage where tenant = ? and ts < ? group by 2, 3, 4 "
                "on conflict (tenant, month, box_id, tier) do update set "
                "requests = requests + excluded.requests, "
                "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "cost = cost + excluded.cost",
                [tenant, cutoff],
            )
            count = store.db.execute(
                "delete from usage where tenant = ? and ts < ?", [tenant, cutoff]
            ).rowcount
            if count:
                deleted[tenant] = count
                store.record_event(
                    "usage_retention", tenant=tenant, detail=f"{count} rows older than {days} days summarised"
                )
    return deleted


async def running(
    writer: StoreWriter, days_of: Callable[[str], int | None], every_s: float = RETENTION_EVERY_S
) -> AsyncIterator[None]:
    """aiohttp cleanup context: apply retention now and every `every_s` after."""

    async def loop() -> None:
        while True:
            try:
                deleted = await writer.call(apply, days_of)
            except LoraboxError as exc:
                log.warning("retention not applied (next try in %.0f h): %s", every_s / 3600, exc)
            else:
                for tenant, count in deleted.items():
                    log.info("retention: %d usage rows of %s summarised and deleted", count, tenant)
            await asyncio.sleep(every_s)

    async with background.running(loop()):
        yield
