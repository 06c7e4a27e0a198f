"""Reminder firer: turns a due reminder into notifications, exactly once.

The timer moves a due reminder from the wheel to `notifyd:reminders` (atomically, so with
several instances it arrives once); even if an entry is replayed, the guarded UPDATE (`status
= 'scheduled' AND reminder_time <= now()`) lets only one transaction fire it. That transaction
also inserts the notifications and records their ids, so a reminder is never `fired` without
them, nor are they made twice. A reminder moved later after its old entry left the wheel is
simply not due: the entry is dropped and the new wheel entry fires it at the new time.
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
from notifyd.store import audit, reminders
from notifyd.store import notifications as notification_store
from notifyd.store.audit import AuditEntry
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.actors.reminders")


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
        rows: list[notification_store.NewNotification] = []
        async with self._pool.acquire() as conn, conn.transaction():
            row = await reminders.fire(
                conn, tenant_id, reminder_id, self._settings.reminder_late_after, due
            )
            if row is None:
                return  # cancelled, already fired, or moved: a stale entry, nothing to do
            if row["status"] == "fired":
                rows = [
                    notification_store.NewNotification(
                        id=uuid7(),
                        tenant_id=tenant_id,
                        created_by=row["created_by"],
                        user_id=planned.user_id,
                        channel=planned.channel,
                        recipient=planned.recipient,
                        subject=None,
                        body=None,  # the dispatcher renders it from the template
                        html_body=None,
                        template_key=TEMPLATE_KEY,
                        context=planned.context,
                        locale=planned.locale,
                        category=CATEGORY,
                        critical=True,
                        idempotency_key=None,
                        request_id=None,
                    )
                    for planned in plan(row)
                ]
                await notification_store.insert_many(conn, rows)
                await reminders.set_notifications(
                    conn, tenant_id, reminder_id, [n.id for n in rows]
                )
            await audit.record(
                conn,
                AuditEntry(
                    tenant_id=tenant_id,
                    user_id=None,
                    action=f"reminder.{row['status']}",
                    ip_address=None,
                    request_id=None,
                    details={
                        "reminder_id": str(reminder_id),
                        "late": row["late"],
                        "lateness_ms": row["lateness_ms"],
                        "notifications": len(rows),
                    },
                ),
            )
        self._metrics.reminder_lateness.observe(row["lateness_ms"] or 0)
        self._metrics.reminders.labels(row["status"]).inc()
        if rows:
            async with self._redis.pipeline(transaction=False) as pipe:
                for notification in rows:
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
