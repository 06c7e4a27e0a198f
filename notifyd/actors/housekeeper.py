"""Housekeeper: deletes idempotency keys past their lifetime, a batch at a time.

Batches keep each DELETE short so it never holds locks long enough to slow the request path;
several instances running it at once only share the work.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from notifyd.store import idempotency
from notifyd.supervisor import sleep_or_stop

log = logging.getLogger("notifyd.actors.housekeeper")


class Housekeeper:
    name = "housekeeper"

    def __init__(self, pool: asyncpg.Pool, *, ttl: float, interval: float, batch: int = 1000):
        self._pool = pool
        self._ttl = ttl
        self._interval = interval
        self._batch = batch

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            removed = await self.sweep_once()
            if removed:
                log.info("expired idempotency keys removed", extra={"count": removed})
            if await sleep_or_stop(stop, self._interval):
                return

    async def sweep_once(self) -> int:
        total = 0
        while True:
            removed = await idempotency.purge_expired(self._pool, self._ttl, self._batch)
            total += removed
            if removed < self._batch:
                return total
