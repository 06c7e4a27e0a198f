"""Delivery events out: every notification status change, published to a Kafka topic.

With `NOTIFYD_KAFKA_EVENTS_TOPIC` set, a trigger on `notifications` (migration 0011) writes
each status change (the insert as `queued`, then `dispatched`, `sending`, `sent`, ...) into
`delivery_events_outbox` in the same transaction as the change: a change that commits has its
event, one that rolls back has none, whichever statement made it. This actor relays the
outbox to the topic and deletes the rows Kafka acknowledged (acks=all, idempotent producer).

- Keyed by tenant: one tenant's events are in one partition, in the order the relay numbered
  them. The outbox id is taken at insert, not at commit, so ids can become visible out of
  order; the relay numbers (`seq`, migration 0019) only rows it can see, in one statement
  with its counter, so each tenant's `event_id`s only grow, and for one notification they
  follow its changes (each change waits for the previous one's row lock, so its row is
  inserted after that one committed).
- At least once: a crash between Kafka's acknowledgement and the delete publishes those rows
  again, numbered as before; each record carries `event_id` (its `seq`) for consumers to
  deduplicate.
- One relay at a time across instances (a PostgreSQL advisory lock held on a connection of
  its own): two relays would interleave one tenant's events.
- The switch: capture runs while `delivery_events_switch.enabled`; the daemon sets it from
  the setting at start (`set_capture`), so a deployment without the topic stores nothing,
  and the rows captured before it was turned off wait for it to be turned on again.
- Kafka down: the rows wait in PostgreSQL; the producer's failure crashes the actor and the
  supervisor restarts it with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from notifyd.ingest.kafka_connection import KafkaConnection
from notifyd.settings import Settings
from notifyd.store.pool import Conn, Executor
from notifyd.supervisor import sleep_or_stop

log = logging.getLogger("notifyd.ingest.kafka_delivery_events")

SCHEMA_VERSION = 1
BATCH = 500  # outbox rows relayed per round
IDLE_S = 0.2  # wait between rounds when the outbox is empty
LEADER_RETRY_S = 2.0  # an instance that is not the relay looks again this often
ADVISORY_LOCK = 0x6E6F746966796431  # "notifyd1": the relay's advisory lock key

SET_CAPTURE = "UPDATE delivery_events_switch SET enabled = $1"
TAKE_LEAD = "SELECT pg_try_advisory_lock($1)"
# rows numbered by a relay that stopped before Kafka acknowledged them: published first, again
NUMBERED = """
SELECT seq, tenant_id, notification_id, channel, status, changed_at
FROM delivery_events_outbox WHERE seq IS NOT NULL ORDER BY seq LIMIT $1
"""
# the next rows visible now, numbered after every row numbered before (in id order among them)
NUMBER_NEXT = """
WITH next AS (
    SELECT id, row_number() OVER (ORDER BY id) AS n
    FROM (SELECT id FROM delivery_events_outbox WHERE seq IS NULL ORDER BY id LIMIT $1) AS s
), counter AS (
    UPDATE delivery_events_relay SET last_seq = last_seq + (SELECT count(*) FROM next)
    RETURNING last_seq - (SELECT count(*) FROM next) AS base
)
UPDATE delivery_events_outbox o SET seq = counter.base + next.n
FROM next, counter WHERE o.id = next.id
RETURNING o.seq, o.tenant_id, o.notification_id, o.channel, o.status, o.changed_at
"""
RELAYED = "DELETE FROM delivery_events_outbox WHERE seq = ANY($1::bigint[])"


async def set_capture(executor: Executor, enabled: bool) -> None:
    """Turn capture on or off for every instance (the daemon calls it at start)."""
    await executor.execute(SET_CAPTURE, enabled)


def encode(row: asyncpg.Record) -> bytes:
    """One delivery event, as the record's value (the key is the tenant id)."""
    return orjson.dumps(
        {
            "version": SCHEMA_VERSION,
            "event_id": row["seq"],
            "type": "notification.status_changed",
            "tenant_id": row["tenant_id"],
            "notification_id": str(row["notification_id"]),
            "channel": row["channel"],
            "status": row["status"],
            "changed_at": row["changed_at"].isoformat(),
        }
    )


class KafkaDeliveryEvents:
    name = "kafka:delivery-events"

    def __init__(self, *, settings: Settings, pool: asyncpg.Pool) -> None:
        self._connection = KafkaConnection.from_settings(settings)
        self._topic = settings.kafka_events_topic
        self._pool = pool

    def producer(self) -> AIOKafkaProducer:
        options: dict[str, Any] = self._connection.client_options()
        return AIOKafkaProducer(acks="all", enable_idempotence=True, **options)

    async def run(self, stop: asyncio.Event) -> None:
        async with self._pool.acquire() as lead:
            while not await lead.fetchval(TAKE_LEAD, ADVISORY_LOCK):
                if await sleep_or_stop(stop, LEADER_RETRY_S):
                    return
            try:
                await self._relay(lead, stop)
            finally:
                if not lead.is_closed():
                    await lead.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK)

    async def _relay(self, conn: Conn, stop: asyncio.Event) -> None:
        producer = self.producer()
        await producer.start()  # raises when no broker answers: the supervisor retries
        log.info("relaying delivery events", extra={"topic": self._topic})
        try:
            numbered = True  # look for rows a stopped relay numbered, until none are left
            while not stop.is_set():
                rows = await conn.fetch(NUMBERED, BATCH) if numbered else []
                if not rows:
                    numbered = False
                    numbered_now = await conn.fetch(NUMBER_NEXT, BATCH)
                    # RETURNING gives no order: published in the order numbered
                    rows = sorted(numbered_now, key=operator.itemgetter("seq"))
                if not rows:
                    await sleep_or_stop(stop, IDLE_S)
                    continue
                # sent in order; the idempotent producer keeps that order per partition
                sent = [
                    await producer.send(self._topic, encode(row), key=row["tenant_id"].encode())
                    for row in rows
                ]
                await asyncio.gather(*sent)
                await conn.execute(RELAYED, [row["seq"] for row in rows])
        finally:
            await producer.stop()
