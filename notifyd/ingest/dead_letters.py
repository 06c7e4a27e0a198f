"""An event a broker source (Kafka, RabbitMQ) could not accept, copied to the dead letters.

Shaped like a stream consumer's dead letter for the events stream, so that `notifyd dlq
requeue` replays it there (same schema, deduplicated the same way); bounded: a huge event is
refused, and only its head is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from notifyd.alerts import Alerting
from notifyd.keys import INGEST_GROUP, Keys
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.ingest")


@dataclass(frozen=True, slots=True)
class EventDeadLetters:
    producer: Producer
    keys: Keys
    alerts: Alerting
    source: str
    max_bytes: int  # of an event kept (NOTIFYD_EVENT_MAX_BYTES)

    async def add(
        self, body: bytes, reason: str, deliveries: int, where: Mapping[str, str], described: str
    ) -> None:
        """The event's body with the reason, its deliveries and `where` it was read
        (`described` in the operators' alert)."""
        extra = {"source": self.source, **where, "reason": reason, "deliveries": deliveries}
        log.warning("event dead-lettered", extra=extra)
        fields: dict[bytes | str, bytes | str] = {
            "stream": self.keys.events,
            "group": INGEST_GROUP,
            "source": self.source,
        }
        fields.update(where.items())
        fields.update(
            {"reason": reason, "deliveries": str(deliveries), "f:event": body[: self.max_bytes]}
        )
        if len(body) > self.max_bytes:
            fields["truncated"] = str(len(body))
        await self.producer.add(self.keys.dead_letters, fields)
        self.alerts.raise_alert(
            "dead-letter:events",
            "notifyd: events are being dead-lettered",
            f"An event from {described} was dead-lettered ({reason}). "
            f"{self.keys.dead_letters} holds it (field f:event) with the reason.",
        )
