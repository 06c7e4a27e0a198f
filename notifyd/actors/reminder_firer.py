"""Reminder firer: turns a due reminder into notifications, exactly once.

The timer moves a due reminder from the wheel to `notifyd:reminders` (atomically, so with
several instances it arrives once); even if an entry is replayed, the guarded UPDATE (`status
= 'scheduled'` and still due at the entry's time) lets only one statement fire it. That one
statement also inserts the notifications, records their ids and the audit row, so a reminder
is never `fired` without them, nor are they made twice; two round trips in all (read, fire).
A reminder moved later after its old entry left the wheel is simply not due: the entry is
dropped and the new wheel entry fires it at the new time.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from notifyd.ids import parse_uuid, uuid7
from notifyd.keys import FIRE_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.payloads import NotificationIntent
from notifyd.reminders import CATEGORY, TEMPLATE_KEY, plan
from notifyd.settings import Settings
from notifyd.store import reminders
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.actors.reminders")

FIRE_TRIES = 3


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
            dead_letters=keys.dead_letters,
            producer=producer,
            concurrency=settings.dispatch_concurrency,
            batch=max(16, settings.dispatch_concurrency),
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts + 5,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, entry: Entry) -> None:
        try:
            tenant_id = entry.fields[b"tenant_id"].decode()
            reminder_id = parse_uuid(entry.fields[b"id"].decode())
            due_ms = entry.fields.get(b"due_ms")
            # the due time this entry was moved for (1 ms of float rounding allowed); an
            # entry without one (added by hand) counts as due now
            due = (
                datetime.fromtimestamp(float(due_ms) / 1000, UTC) + timedelta(milliseconds=1)
                if due_ms is not None
                else datetime.now(UTC)
            )
        except (KeyError, UnicodeDecodeError, ValueError):
            raise Poison("malformed reminder entry") from None
        if reminder_id is None:
            raise Poison("reminder entry names no reminder")
        row = None
        for _ in range(FIRE_TRIES):
            reminder = await reminders.peek(self._pool, tenant_id, reminder_id)
            if (
                reminder is None
                or reminder["status"] != "scheduled"
                or reminder["reminder_time"] > due
            ):
                return  # cancelled, already fired, or moved later: a stale entry
            planned = [
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
        made = planned if row["status"] == "fired" else []
        self._metrics.reminder_lateness.observe(row["lateness_ms"] or 0)
        self._metrics.reminders.labels(row["status"]).inc()
        if made:
            async with self._redis.pipeline(transaction=False) as pipe:
                for notification in made:
                    intent = NotificationIntent(tenant_id, str(notification.id), "reminder")
                    self._producer.add_in(pipe, self._keys.intents, intent.to_fields())
                await pipe.execute()
        log.info(
            "reminder %s",
            row["status"],
            extra={
                "reminder_id": str(reminder_id),
                "lateness_ms": row["lateness_ms"],
                "late": row["late"],
            },
        )
