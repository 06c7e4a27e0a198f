"""Events from the Redis stream `<prefix>:events`, consumed by the group "ingest".

Publishers add one field, `event`, holding the event's JSON:

    XADD notifyd:events * event '{"event_id": "evt-81", "tenant_id": "TEN-0001", ...}'

Built on the one consumer loop (`StreamConsumer`): several instances share the stream, a
crashed peer's entries are taken over after `NOTIFYD_CLAIM_IDLE`, and an entry is
acknowledged only once its notifications are committed (or it turned out a duplicate). A
malformed event, or one for a tenant (or `critical`) beyond the stream's binding
(`NOTIFYD_EVENTS_TENANTS`, `NOTIFYD_EVENTS_ALLOW_CRITICAL`), is `Poison`: it goes to the
dead-letter stream with the reason at once, instead of being retried forever or holding up
the entries behind it. An event that fails for
another reason (PostgreSQL down) stays pending and is retried, up to
`NOTIFYD_EVENT_MAX_DELIVERIES` deliveries; the stream entry is its only copy until then, so
that bound is generous.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis

from notifyd.alerts import Alerting
from notifyd.ingest.accept import EventAcceptor
from notifyd.ingest.binding import Binding, admit
from notifyd.ingest.events import (
    DomainEvent,
    EventLimits,
    MalformedEvent,
    WorkflowEvent,
    parse_event,
)
from notifyd.keys import INGEST_GROUP, Keys
from notifyd.schemas.errors import FieldError
from notifyd.settings import Settings
from notifyd.streams.consumer import Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.ingest.redis")

EVENT_FIELD = b"event"


def event_of(fields: dict[bytes, bytes], limits: EventLimits) -> DomainEvent | WorkflowEvent:
    """The event an entry carries; other fields of the entry are the publisher's own."""
    raw = fields.get(EVENT_FIELD)
    if raw is None:
        raise MalformedEvent(
            [FieldError("event", "the entry has no 'event' field (XADD <stream> * event '<json>')")]
        )
    return parse_event(raw, limits)


class RedisEventSource:
    name = "ingest:redis"

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        acceptor: EventAcceptor,
        producer: Producer,
        alerts: Alerting,
        consumer_name: str,
    ) -> None:
        self._acceptor = acceptor
        self._alerts = alerts
        self._limits = EventLimits.from_settings(settings)
        self._binding = Binding.for_source(settings, "redis")
        self.consumer = StreamConsumer(
            redis,
            stream=keys.events,
            group=INGEST_GROUP,
            consumer=consumer_name,
            handle=self.handle,
            dead_letters=keys.dead_letters,
            producer=producer,
            on_dead=self._on_dead,
            concurrency=settings.event_concurrency,
            batch=max(16, settings.event_concurrency),
            timing=Timing.from_settings(settings),
            max_deliveries=settings.event_max_deliveries,
        )

    async def run(self, stop: asyncio.Event) -> None:
        await self.consumer.run(stop)

    async def handle(self, entry: Entry) -> None:
        try:
            event = event_of(entry.fields, self._limits)
            admit(event, self._binding)
            await self._acceptor.accept(event, source="redis")
        except MalformedEvent as exc:
            raise Poison(str(exc)) from None

    async def _on_dead(self, entry: Entry, reason: str) -> None:
        """The publisher sent something notifyd cannot use: the operator hears of it (at most
        once per `NOTIFYD_ALERT_INTERVAL`); the event itself is on the dead-letter stream."""
        self._alerts.raise_alert(
            "dead-letter:events",
            "notifyd: events are being dead-lettered",
            f"An event on {self.consumer.stream} was dead-lettered ({reason}). The dead-letter "
            "stream holds it (field f:event) with the reason.",
        )
