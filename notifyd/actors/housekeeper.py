"""Housekeeper: deletes idempotency keys and ingested event ids past their lifetime, forgets
dead consumers, and trims stream entries every group has acknowledged (`streams.trim`).

Batches keep each DELETE short so it never holds locks long enough to slow the request path;
several instances running it at once only share the work. Consumer names of processes that
are gone (idle for a day, nothing pending) are removed from the stream groups.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.asyncio import Redis

from notifyd.store import idempotency, ingested_events
from notifyd.streams.consumer import forget_idle_consumers
from notifyd.streams.trim import Trimmer
from notifyd.supervisor import sleep_or_stop

log = logging.getLogger("notifyd.actors.housekeeper")

DEAD_CONSUMER_IDLE_S = 86_400.0


class Housekeeper:
    name = "housekeeper"

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        ttl: float,
        interval: float,
        batch: int = 1000,
        redis: Redis | None = None,
        groups: list[tuple[str, str]] | None = None,
        consumer_idle: float = DEAD_CONSUMER_IDLE_S,
        event_ttl: float | None = None,
    ):
        self._event_ttl = event_ttl
        self._pool = pool
        self._ttl = ttl
        self._interval = interval
        self._batch = batch
        self._redis = redis
        self._groups = groups or []
        self._consumer_idle_ms = int(consumer_idle * 1000)
        self._trimmer = Trimmer(redis) if redis is not None else None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            removed = await self.sweep_once()
            if removed:
                log.info("expired idempotency keys removed", extra={"count": removed})
            events = await self.forget_old_events()
            if events:
                log.info("old event ids forgotten", extra={"count": events})
            forgotten = await self.forget_dead_consumers()
            if forgotten:
                log.info("dead stream consumers forgotten", extra={"count": forgotten})
            trimmed = await self.trim_streams()
            if trimmed:
                log.debug("acknowledged stream entries trimmed", extra={"count": trimmed})
            if await sleep_or_stop(stop, self._interval):
                return

    async def sweep_once(self) -> int:
        total = 0
        while True:
            removed = await idempotency.purge_expired(self._pool, self._ttl, self._batch)
            total += removed
            if removed < self._batch:
                return total

    async def forget_old_events(self) -> int:
        """Event ids kept for deduplication, past NOTIFYD_EVENT_DEDUPE_TTL."""
        if self._event_ttl is None:
            return 0
        total = 0
        while True:
            removed = await ingested_events.purge_older_than(
                self._pool, self._event_ttl, self._batch
            )
            total += removed
            if removed < self._batch:
                return total

    async def forget_dead_consumers(self) -> int:
        if self._redis is None:
            return 0
        total = 0
        for stream, group in self._groups:
            total += await forget_idle_consumers(self._redis, stream, group, self._consumer_idle_ms)
        return total

    async def trim_streams(self) -> int:
        """Entries every group of their stream has acknowledged, removed."""
        if self._trimmer is None:
            return 0
        streams = dict.fromkeys(stream for stream, _ in self._groups)
        return sum([await self._trimmer.trim_acknowledged(stream) for stream in streams])
