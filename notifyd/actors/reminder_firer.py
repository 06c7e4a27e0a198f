"""Reminder firer: turns a due reminder into notifications, exactly once.

The timer moves a due reminder from the wheel to `notifyd:reminders` (atomically, so with
several instances it arrives once); even if an entry is replayed, the guarded UPDATE (`status
= 'scheduled'` and still due at the entry's time) lets only one statement fire it. That one
statement also inserts the notifications, records their ids and the audit row, so a reminder
is never `fired` without them, nor are they made twice; two round trips in all (read, fire).
A reminder moved later after its old entry left the wheel is simply not due: the entry is
dropped and the new wheel entry fires it at the new time.

The timer moves reminders up to NOTIFYD_REMINDER_LOOKAHEAD early (`actors.timer`), so a batch
is read and planned ahead of its time and fired in waves, each reminder once its own time
has come, by the wall clock: what is left of lateness is the wake-up and the statement.
A reminder changed between the read and its wave fails the statement's guard and is read
again (`_fire_one`), as it would have been without the lookahead.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

import asyncpg
from redis.asyncio import Redis

from notifyd.ids import uuid7
from notifyd.keys import FIRE_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.payloads import NotificationIntent
from notifyd.reminders import CATEGORY, TEMPLATE_KEY, plan
from notifyd.settings import Settings
from notifyd.store import reminders
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.due import due_of, in_waves, latest_due, sleep_until
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.actors.reminders")

FIRE_TRIES = 3
FIRE_BATCH = 100  # reminders read per stream read, and fired by one statement at most
# Batches waiting for their time hold their slot (their entries are acknowledged once
# fired), so there must be enough for a lookahead's worth of reminders plus the one being
# read: 16 batches of 100 cover 0.3 s at 5,000 reminders/s.
FIRE_BATCHES_IN_FLIGHT = 16


def _parse(entry: Entry) -> tuple[tuple[str, uuid.UUID], datetime]:
    """((tenant, reminder id), the due time this entry was moved for)."""
    try:
        tenant_id = entry.fields[b"tenant_id"].decode()
        reminder_id = uuid.UUID(entry.fields[b"id"].decode())
        return (tenant_id, reminder_id), due_of(entry)
    except (KeyError, UnicodeDecodeError, ValueError):
        raise Poison("malformed reminder entry") from None


def _planned(reminder: asyncpg.Record) -> list[reminders.ReminderNotification]:
    return [
        reminders.ReminderNotification(
            id=uuid7(),
            user_id=p.user_id,
            channel=p.channel,
            recipient=p.recipient,
            context=p.context,
            locale=p.locale,
        )
        for p in plan(reminder)
    ]


class ReminderFirer:
    name = "reminders"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        metrics: Metrics,
        producer: Producer,
        consumer_name: str,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._producer = producer
        self.consumer = StreamConsumer(
            redis,
            stream=keys.reminders,
            group=FIRE_GROUP,
            consumer=consumer_name,
            handle=self.handle,
            handle_batch=self.handle_batch,
            dead_letters=keys.dead_letters,
            producer=producer,
            concurrency=FIRE_BATCHES_IN_FLIGHT,
            batch=FIRE_BATCH,
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts + 5,
            metrics=metrics,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, entry: Entry) -> None:
        """One entry on its own (the consumer's per-entry path)."""
        (tenant_id, reminder_id), due = _parse(entry)
        await self._fire_one(tenant_id, reminder_id, due)

    async def _fire_one(self, tenant_id: str, reminder_id: uuid.UUID, due: datetime) -> None:
        row = None
        for _ in range(FIRE_TRIES):
            reminder = await reminders.peek(self._pool, tenant_id, reminder_id)
            if (
                reminder is None
                or reminder["status"] != "scheduled"
                or reminder["reminder_time"] > due
            ):
                return  # cancelled, already fired, or moved later: a stale entry
            planned = _planned(reminder)
            await sleep_until(reminder["reminder_time"])
            row = await reminders.fire(
                self._pool,
                reminder,
                due=due,
                late_after=self._settings.reminder_late_after,
                template_key=TEMPLATE_KEY,
                category=CATEGORY,
                notifications=planned,
                audit_id=uuid7(),
            )
            if row is not None:
                break
            # changed between the read and the fire (a PATCH of the interview time): read
            # it again and plan with what it is now
        if row is None:
            raise RuntimeError("reminder kept changing while firing; the entry is retried")
        await self._after_fire([(row, planned if row["status"] == "fired" else [])])

    async def handle_batch(self, entries: list[Entry]) -> None:
        """Everything one read returned: one query reads the rows, then each wave of those
        whose time has come is fired in one statement; a reminder that changed between the
        read and its wave goes through `_fire_one` on its own."""
        wanted = await latest_due(entries, _parse, self.consumer.dead_letter)
        rows = await reminders.peek_many(self._pool, list(wanted))
        batch = [
            (reminders.DueReminder(row, wanted[(row["tenant_id"], row["id"])]), _planned(row))
            for row in rows
            if row["status"] == "scheduled"
            and row["reminder_time"] <= wanted[(row["tenant_id"], row["id"])]
        ]
        if not batch:
            return  # all stale: cancelled, fired, or moved later
        await in_waves(batch, lambda item: item[0].row["reminder_time"], self._fire_wave)

    async def _fire_wave(
        self, batch: list[tuple[reminders.DueReminder, list[reminders.ReminderNotification]]]
    ) -> None:
        """Reminders whose time has come, fired in one statement."""
        fired = await reminders.fire_many(
            self._pool,
            batch,
            late_after=self._settings.reminder_late_after,
            template_key=TEMPLATE_KEY,
            category=CATEGORY,
            audit_ids=[uuid7() for _ in batch],
        )
        by_id = {item.row["id"]: planned for item, planned in batch}
        await self._after_fire(
            [(row, by_id[row["id"]] if row["status"] == "fired" else []) for row in fired]
        )
        done = {row["id"] for row in fired}
        for item, _ in batch:
            if item.row["id"] not in done:  # re-timed meanwhile: fire it with what it is now
                await self._fire_one(item.row["tenant_id"], item.row["id"], item.due)

    async def _after_fire(
        self, results: list[tuple[asyncpg.Record, list[reminders.ReminderNotification]]]
    ) -> None:
        """Metrics, one pipelined XADD of every intent, a log line per reminder."""
        for row, _ in results:
            self._metrics.reminder_lateness.observe(row["lateness_ms"] or 0)
            self._metrics.reminders.labels(row["status"]).inc()
        if any(made for _, made in results):
            async with self._redis.pipeline(transaction=False) as pipe:
                for row, made in results:
                    for notification in made:
                        intent = NotificationIntent(
                            row["tenant_id"], str(notification.id), "reminder"
                        )
                        self._producer.add_in(pipe, self._keys.intents, intent.to_fields())
                await pipe.execute()
        for row, _ in results:
            log.info(
                "reminder %s",
                row["status"],
                extra={
                    "reminder_id": str(row["id"]),
                    "lateness_ms": row["lateness_ms"],
                    "late": row["late"],
                },
            )
