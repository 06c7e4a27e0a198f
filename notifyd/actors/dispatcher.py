"""Dispatcher: turns a stored notification into a delivery on its channel's stream.

For each intent it renders what was not rendered at accept time (notifications made by other
producers: reminders, ingested events), applies the recipient's preferences (critical ones
bypass opt-outs), marks the row `dispatched`, and adds the delivery to
`notifyd:deliver:{channel}`. A replayed intent for an already dispatched row re-adds the
delivery: senders claim rows in PostgreSQL, so a duplicate entry is harmless, a missing one
would not be.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from redis.asyncio import Redis

from notifyd.alerts import Alerts
from notifyd.compose import compose
from notifyd.keys import DISPATCH_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.payloads import DeliveryRef, NotificationIntent, PayloadError
from notifyd.preferences import suppression_reason
from notifyd.providers.render import TemplateError
from notifyd.settings import Settings
from notifyd.store import deliveries
from notifyd.store import preferences as preference_store
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.actors.dispatcher")


class Dispatcher:
    name = "dispatcher"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        consumer_name: str,
        alerts: Alerts,
        producer: Producer,
        metrics: Metrics,
    ) -> None:
        self._alerts = alerts
        self._producer = producer
        self._pool = pool
        self._keys = keys
        self._settings = settings
        self.consumer = StreamConsumer(
            redis,
            stream=keys.intents,
            group=DISPATCH_GROUP,
            consumer=consumer_name,
            handle=self.handle,
            dead_letters=keys.dead_letters,
            producer=producer,
            on_dead=self._on_dead,
            concurrency=settings.dispatch_concurrency,
            batch=max(16, settings.dispatch_concurrency),
            timing=Timing.from_settings(settings),
            max_deliveries=settings.send_max_attempts,
            metrics=metrics,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, entry: Entry) -> None:
        try:
            intent = NotificationIntent.from_fields(entry.fields)
            notification_id = intent.uuid
        except PayloadError as exc:
            raise Poison(str(exc)) from None
        row = await deliveries.load_for_dispatch(self._pool, intent.tenant_id, notification_id)
        if row is None:
            raise Poison(f"no notification {notification_id} in tenant {intent.tenant_id!r}")
        status = row["status"]
        if status == "queued":
            status = await self._route(row)
        if status == "dispatched":
            ref = DeliveryRef(intent.tenant_id, str(notification_id))
            await self._producer.add(self._keys.deliver(row["channel"]), ref.to_fields())

    async def _route(self, row: asyncpg.Record) -> str:
        """Render, apply preferences, mark dispatched; returns the row's new status."""
        tenant_id, notification_id = row["tenant_id"], row["id"]
        subject, body, html = row["subject"], row["body"], row["html_body"]
        if body is None:
            try:
                rendered = await compose(
                    self._pool,
                    tenant_id=tenant_id,
                    channel=row["channel"],
                    template_key=row["template_key"],
                    context=row["context"],
                    subject=subject,
                    message=body,
                    locale=row["locale"],
                    default_locale=self._settings.default_locale,
                )
            except TemplateError as exc:
                await deliveries.fail_queued(self._pool, tenant_id, notification_id, exc.reason)
                log.warning("notification failed to render", extra={"id": str(notification_id)})
                return "failed"
            subject, body, html = rendered.subject, rendered.text, rendered.html
        if row["user_id"] is not None:
            prefs = await preference_store.load(self._pool, tenant_id, row["user_id"])
            reason = suppression_reason(
                prefs, channel=row["channel"], category=row["category"], critical=row["critical"]
            )
            if reason is not None:
                await deliveries.suppress(self._pool, tenant_id, notification_id, reason)
                return "suppressed"
        await deliveries.dispatch(self._pool, tenant_id, notification_id, subject, body, html)
        return "dispatched"

    async def _on_dead(self, entry: Entry, reason: str) -> None:
        """Only the stream entry is given up on: a row it names stays `queued` and the sweeper
        re-enqueues it, so an outage or a crashing handler never fails a notification."""
        self._alerts.raise_alert(
            "dead-letter:intents",
            "notifyd: intents are being dead-lettered",
            f"An entry of {self.consumer.stream} was dead-lettered ({reason}). See the "
            "dead-letter stream and the log.",
        )
