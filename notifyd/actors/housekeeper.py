"""Housekeeper: deletes idempotency keys and ingested event ids past their lifetime, rows of
notifications, messages, reminders, audit and finished workflow runs past their retention,
forgets dead consumers, turns off the event capture nothing consumes, analyzes the tables
that outgrew their planner statistics (`store.statistics`), and trims stream entries every
group has acknowledged (`streams.trim`).

Retention (`NOTIFYD_RETAIN_*`, 0 keeps forever) deletes only rows in a final state, a batch
of `NOTIFYD_RETAIN_BATCH` rows by primary key per statement (its own short transaction),
with `NOTIFYD_RETAIN_PAUSE` between statements so the request path keeps the database
(`store.retention`: rows a request holds are skipped, not waited for).

Batches keep each DELETE short so it never holds locks long enough to slow the request path;
several instances running it at once only share the work. Consumer names of processes that
are gone (idle for a day, nothing pending) are removed from the stream groups.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis

from notifyd.metrics import Metrics
from notifyd.store import (
    audit,
    idempotency,
    ingested_events,
    messages,
    notifications,
    reminders,
    statistics,
    webhooks,
    workflows,
)
from notifyd.store import retention as kept
from notifyd.store.pool import Conn, Executor
from notifyd.streams.consumer import forget_idle_consumers
from notifyd.streams.trim import Trimmer
from notifyd.supervisor import sleep_or_stop

log = logging.getLogger("notifyd.actors.housekeeper")

DEAD_CONSUMER_IDLE_S = 86_400.0
# how long turning capture off may hold a table's writes (they queue behind the ALTER TABLE)
CAPTURE_LOCK_TIMEOUT_S = 0.2

Purge = Callable[[Executor, uuid.UUID, kept.Cutoff, int], Awaitable[kept.Batch]]


@dataclass(frozen=True, slots=True)
class Retention:
    """Seconds each family is kept (0: forever), and the pace of the purge."""

    notifications: float = 0.0
    messages: float = 0.0
    reminders: float = 0.0
    audit: float = 0.0
    workflow_runs: float = 0.0
    webhook_deliveries: float = 0.0
    batch: int = 1000
    pause: float = 0.1

    def families(self) -> list[tuple[str, float, Purge]]:
        """(table, seconds kept, its purge) for every family with a retention."""
        every: list[tuple[str, float, Purge]] = [
            ("notifications", self.notifications, notifications.purge_expired),
            ("messages", self.messages, messages.purge_expired),
            ("interview_reminders", self.reminders, reminders.purge_expired),
            ("audit_log", self.audit, audit.purge_expired),
            ("workflow_runs", self.workflow_runs, workflows.purge_expired),
            ("webhook_deliveries", self.webhook_deliveries, webhooks.purge_expired),
        ]
        return [family for family in every if family[1] > 0]


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
        retention: Retention | None = None,
        metrics: Metrics | None = None,
    ):
        self._event_ttl = event_ttl or None  # 0 keeps them forever
        self._retention = retention or Retention()
        self._metrics = metrics
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
            for table, count in (await self.purge_expired(stop)).items():
                log.info("expired rows deleted", extra={"table": table, "count": count})
            forgotten = await self.forget_dead_consumers()
            if forgotten:
                log.info("dead stream consumers forgotten", extra={"count": forgotten})
            switched = await self.trim_event_capture()
            if switched:
                log.info("event capture turned off: nothing consumes it", extra={"count": switched})
            analyzed = await self.refresh_statistics()
            if analyzed:
                log.info("planner statistics refreshed", extra={"tables": analyzed})
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
            self._count("ingested_events", removed)
            if removed < self._batch:
                return total

    async def purge_expired(self, stop: asyncio.Event | None = None) -> dict[str, int]:
        """Rows past their family's retention, deleted a batch at a time (a pause between
        batches); the count deleted per table. Returns early when `stop` is set."""
        stop = stop or asyncio.Event()
        r = self._retention
        deleted: dict[str, int] = {}
        for table, seconds, purge in r.families():
            async with self._pool.acquire() as conn:
                if not await kept.try_lock(conn, table):
                    continue  # another instance is purging this family
                try:
                    count = await self._purge_family(conn, stop, table, seconds, purge)
                finally:
                    await kept.unlock(conn, table)
            if count:
                deleted[table] = count
            if stop.is_set():
                break
        return deleted

    async def _purge_family(
        self,
        conn: Conn,
        stop: asyncio.Event,
        table: str,
        seconds: float,
        purge: Purge,
    ) -> int:
        """One family's purge, batch after batch on this (locked) session."""
        r = self._retention
        cut = kept.cutoff(seconds)
        after = kept.NIL
        total = 0
        while True:
            batch = await purge(conn, after, cut, r.batch)
            total += batch.deleted
            self._count(table, batch.deleted)
            if batch.deleted < r.batch or batch.last is None:
                return total
            after = batch.last
            if await sleep_or_stop(stop, r.pause):
                return total

    async def trim_event_capture(self) -> int:
        """The capture triggers of tables whose events nobody consumes now, turned off (an
        endpoint's change only turns them on; see 0018_event_capture_on_demand.sql). Skipped
        for this round when a table's writes hold it past the lock timeout."""
        async with self._pool.acquire() as conn:
            try:
                return await webhooks.trim_event_capture(conn, CAPTURE_LOCK_TIMEOUT_S)
            except asyncpg.LockNotAvailableError:
                log.info("event capture left on this round: its tables were busy")
                return 0

    async def refresh_statistics(self) -> list[str]:
        """The tables that outgrew their planner statistics, analyzed
        (`store.statistics`)."""
        async with self._pool.acquire() as conn:
            return await statistics.refresh_stale(conn)

    def _count(self, table: str, rows: int) -> None:
        if self._metrics is not None and rows:
            self._metrics.retention_purged.labels(table).inc(rows)

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
