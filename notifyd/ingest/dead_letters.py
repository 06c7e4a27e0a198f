"""An event a broker source (Kafka, RabbitMQ) could not accept, copied to the dead letters.

Shaped like a stream consumer's dead letter for the events stream, so that `notifyd dlq
requeue` replays it there (same schema, deduplicated the same way); the Redis source's
consumer writes its own. Bounded: a huge event is refused, and only its head is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from notifyd.alerts import Alerting
from notifyd.keys import INGEST_GROUP, Keys
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.ingest")


async def dead_letter_event(
    producer: Producer,
    keys: Keys,
    alerts: Alerting,
    *,
    source: str,
    body: bytes,
    max_bytes: int,
    reason: str,
    deliveries: int,
    where: Mapping[str, str],
    described: str,
) -> None:
    """The event's `body` (its first `max_bytes`) with the reason, how many deliveries it
    had, and `where` it was read (`described` in the operators' alert)."""
    log.warning(
        "event dead-lettered",
        extra={"source": source, **where, "reason": reason, "deliveries": deliveries},
    )
    fields: dict[bytes | str, bytes | str] = {
        "stream": keys.events,
        "group": INGEST_GROUP,
        "source": source,
    }
    fields.update(where.items())
    fields.update({"reason": reason, "deliveries": str(deliveries), "f:event": body[:max_bytes]})
    if len(body) > max_bytes:
        fields["truncated"] = str(len(body))
    await producer.add(keys.dead_letters, fields)
    alerts.raise_alert(
        "dead-letter:events",
        "notifyd: events are being dead-lettered",
        f"An event from {described} was dead-lettered ({reason}). {keys.dead_letters} holds "
        "it (field f:event) with the reason.",
    )
