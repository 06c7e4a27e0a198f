"""Sweeper: puts back work whose stream entry is gone, from PostgreSQL, the source of truth.

A row can be stranded when the process died between its commit and its XADD (or, for a REST
send, before its own dispatcher took it: see `accept.outbox.Outbox`), or when Redis lost its
data (flushed, restarted without persistence). Every `NOTIFYD_SWEEP_INTERVAL` the sweeper takes
rows that have not moved for `NOTIFYD_REQUEUE_AFTER` and re-enqueues them where they belong:
`queued` → the intents stream, `dispatched`/`sending`/`retrying` → their channel's delivery
stream. On start it also re-schedules every pending retry on the wheel. Duplicates are harmless
(dispatcher and senders claim rows), so re-enqueueing errs on the side of more.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.payloads import DeliveryRef, NotificationIntent
from notifyd.reminders import wheel_item
from notifyd.retries import retry_item
from notifyd.store import deliveries, reminders
from notifyd.store import workflows as workflow_store
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.supervisor import sleep_or_stop
from notifyd.workflows import wheel_item as step_item

log = logging.getLogger("notifyd.actors.sweeper")

BATCH = 500


class Sweeper:
    name = "sweeper"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        schedule: Schedule,
        metrics: Metrics,
        requeue_after: float,
        reminder_overdue_after: float,
        interval: float,
        producer: Producer,
    ) -> None:
        self._producer = producer
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._schedule = schedule
        self._metrics = metrics
        self._requeue_after = requeue_after
        self._reminder_overdue_after = reminder_overdue_after
        self._interval = interval

    async def run(self, stop: asyncio.Event) -> None:
        await self.rebuild_wheel()
        while not stop.is_set():
            if not await self._redis.exists(self._keys.wheel_epoch):
                log.warning("the timer wheel was lost (Redis flushed or restarted empty)")
                await self.rebuild_wheel()
            await self.sweep_once()
            await self.requeue_overdue_reminders()
            await self.requeue_overdue_steps()
            if await sleep_or_stop(stop, self._interval):
                return

    async def rebuild_wheel(self) -> int:
        """Every pending retry, scheduled reminder and pending workflow step back on the
        wheel, from PostgreSQL.

        Members already there keep their due time (NX), so a rebuild racing the normal flow,
        or another instance's rebuild, changes nothing and fires nothing twice.
        """
        count = await self.rebuild_retries() + await self.rebuild_reminders()
        count += await self.rebuild_workflow_steps()
        await self._redis.set(self._keys.wheel_epoch, b"1")
        if count:
            log.info("timer wheel rebuilt from PostgreSQL", extra={"entries": count})
        return count

    async def rebuild_retries(self) -> int:
        rows = await deliveries.retrying_due(self._pool, 100_000)
        await self._schedule.add_many(
            [
                (
                    retry_item(
                        self._keys,
                        r["channel"],
                        DeliveryRef(r["tenant_id"], str(r["id"])),
                        r["attempts"],
                    ),
                    r["next_attempt_at"],
                )
                for r in rows
            ],
            only_new=True,
        )
        return len(rows)

    async def rebuild_reminders(self) -> int:
        total = 0
        after = None
        while True:
            rows = await reminders.scheduled_page(self._pool, after, BATCH)
            await self._schedule.add_many(
                [
                    (wheel_item(self._keys, r["tenant_id"], r["id"]), r["reminder_time"])
                    for r in rows
                ],
                only_new=True,
            )
            total += len(rows)
            if len(rows) < BATCH:
                return total
            after = (rows[-1]["reminder_time"], rows[-1]["id"])

    async def rebuild_workflow_steps(self) -> int:
        total = 0
        after = None
        while True:
            rows = await workflow_store.pending_page(self._pool, after, BATCH)
            await self._schedule.add_many(
                [
                    (step_item(self._keys, r["tenant_id"], r["run_id"], r["position"]), r["due_at"])
                    for r in rows
                ],
                only_new=True,
            )
            total += len(rows)
            if len(rows) < BATCH:
                return total
            last = rows[-1]
            after = (last["due_at"], last["run_id"], last["position"])

    async def requeue_overdue_steps(self) -> int:
        """A pending workflow step long past due lost its wheel or stream entry: put it back
        (as `requeue_overdue_reminders` does for reminders)."""
        rows = await workflow_store.overdue(self._pool, self._reminder_overdue_after, BATCH)
        await self._schedule.add_many(
            [
                (step_item(self._keys, r["tenant_id"], r["run_id"], r["position"]), r["due_at"])
                for r in rows
            ],
            only_new=True,
        )
        return len(rows)

    async def requeue_overdue_reminders(self) -> int:
        """A scheduled reminder long past due lost its wheel entry (or its stream entry):
        put it back; it fires at once, flagged late. "Long" includes a takeover's lease, so a
        reminder merely waiting in a backlog is not added again and again."""
        rows = await reminders.overdue(self._pool, self._reminder_overdue_after, BATCH)
        await self._schedule.add_many(
            [(wheel_item(self._keys, r["tenant_id"], r["id"]), r["reminder_time"]) for r in rows],
            only_new=True,
        )
        return len(rows)

    async def sweep_once(self) -> int:
        total = 0
        while True:
            stuck = await deliveries.take_stuck(self._pool, self._requeue_after, BATCH)
            if not stuck:
                return total
            async with self._redis.pipeline(transaction=False) as pipe:
                for row in stuck:
                    if row.status == "queued":
                        intent = NotificationIntent(row.tenant_id, str(row.id), reason="requeued")
                        self._producer.add_in(pipe, self._keys.intents, intent.to_fields())
                    else:
                        ref = DeliveryRef(row.tenant_id, str(row.id))
                        self._producer.add_in(
                            pipe, self._keys.deliver(row.channel), ref.to_fields()
                        )
                await pipe.execute()
            self._metrics.requeued.inc(len(stuck))
            log.info("stranded work re-enqueued", extra={"count": len(stuck)})
            total += len(stuck)
            if len(stuck) < BATCH:
                return total
