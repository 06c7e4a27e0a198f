"""After the commit: the accepted rows counted and their intents put on the stream."""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

from redis.exceptions import RedisError

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.payloads import NotificationIntent
from notifyd.store.notifications import NewNotification
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.accept")


def count_accepted(metrics: Metrics, rows: Sequence[NewNotification]) -> None:
    for channel, count in collections.Counter(row.channel for row in rows).items():
        metrics.notifications_accepted.labels(channel).inc(count)


async def announce(
    producer: Producer,
    keys: Keys,
    rows: Sequence[NewNotification],
    metrics: Metrics | None = None,
    *,
    counted: bool = False,
) -> bool:
    """After the commit: count the rows accepted (unless `counted` already) and put their
    intents on the stream. False when Redis failed; the rows stay queued and the sweeper
    enqueues them later."""
    if metrics is not None and not counted:
        count_accepted(metrics, rows)
    try:
        await producer.add_many(
            [
                (keys.intents, NotificationIntent(row.tenant_id, str(row.id)).to_fields())
                for row in rows
            ]
        )
    except RedisError as exc:
        if metrics is not None:
            metrics.enqueue_failures.inc(len(rows))
        log.warning("intents not enqueued; left for the sweeper", extra={"error": repr(exc)})
        return False
    return True
