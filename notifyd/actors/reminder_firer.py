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
        except (KeyError, UnicodeDecodeError):
            raise Poison("malformed reminder entry") from None
        if reminder_id is None:
            raise Poison("reminder entry names no reminder")
        intents: list[NotificationIntent] = []
        async with self._pool.acquire() as conn, conn.transaction():
            row = await reminders.fire(
                conn, tenant_id, reminder_id, self._settings.reminder_late_after
            )
            if row is None:
                return  # cancelled, already fired, or moved later: nothing to do now
            if row["status"] == "fired":
                ids = []
                for planned in plan(row):
                    notification_id = uuid7()
                    await notification_store.insert(
                        conn,
                        notification_store.NewNotification(
                            id=notification_id,
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
                        ),
                    )
                    ids.append(notification_id)
                    intents.append(NotificationIntent(tenant_id, str(notification_id), "reminder"))
                await reminders.set_notifications(conn, tenant_id, reminder_id, ids)
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
                        "notifications": len(intents),
                    },
                ),
            )
        self._metrics.reminder_lateness.observe(row["lateness_ms"] or 0)
        self._metrics.reminders.labels(row["status"]).inc()
        for intent in intents:
            await self._producer.add(self._keys.intents, intent.to_fields())
        log.info(
            "reminder %s",
            row["status"],
            extra={
                "reminder_id": str(reminder_id),
                "lateness_ms": row["lateness_ms"],
                "late": row["late"],
            },
        )
