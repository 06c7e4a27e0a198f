"""Delivery events out: notification status changes read back from a real Kafka topic.

Promises checked: with NOTIFYD_KAFKA_EVENTS_TOPIC set, every status change of every
notification (queued ... sent) is published to the topic, keyed by its tenant, each tenant's
in one partition and in the order of the changes, and the outbox is emptied once Kafka has
them; each tenant's `event_id`s only grow, also when its changes commit in the opposite
order to the one they were captured in; with the setting empty nothing is captured (no outbox
rows to pile up).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from scripts.kafka import KafkaBroker
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.kafka_server import kafka  # noqa: F401  (the session fixture)
from tests.smtp_sink import SmtpSink
from tests.test_ingest_kafka import Topic

TENANTS = ("TEN-A", "TEN-B", "TEN-C")


async def read_all(topic: Topic, count: int, timeout: float = 30) -> list[Any]:
    """Every record of the topic from its start, once `count` are there."""
    consumer = AIOKafkaConsumer(
        topic.name, bootstrap_servers=topic.broker.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    records: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while len(records) < count:
                batch = await consumer.getmany(timeout_ms=500)
                for part in batch.values():
                    records += part
    finally:
        await consumer.stop()
    return records


async def sent_with_events(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    broker: KafkaBroker,
    per_tenant: int,
) -> tuple[Topic, dict[str, str]]:
    """A daemon relaying delivery events to a new topic, and `per_tenant` emails of each of
    TENANTS sent through it (notification id -> tenant), once all are `sent`."""
    topic = Topic(broker, partitions=3)
    await topic.create()
    daemon = await daemon_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_sink.port),
        NOTIFYD_KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
        NOTIFYD_KAFKA_TOPICS="",
        NOTIFYD_KAFKA_EVENTS_TOPIC=topic.name,
    )
    sent_ids: dict[str, str] = {}
    async with Api(daemon) as api:
        for tenant in TENANTS:
            for n in range(per_tenant):
                status, body, _ = await api.post(
                    "/notifications/send/",
                    {
                        "notification_type": "email",
                        "subject": f"Hello {n}",
                        "message": "Your interview is tomorrow.",
                        "recipient": f"p{n}@example.com",
                    },
                    tenant=tenant,
                    role="service",
                )
                assert status == 202, body
                sent_ids[body["notification_id"]] = tenant

    async def all_sent() -> bool:
        statuses = await db.fetch("SELECT status FROM notifications")
        return len(statuses) == len(sent_ids) and all(r["status"] == "sent" for r in statuses)

    await wait_for(all_sent, timeout=30)
    return topic, sent_ids


async def everything_relayed(topic: Topic, db: asyncpg.Connection, at_least: int) -> list[Any]:
    """Every record of the topic, once the outbox is empty (nothing more on its way)."""

    async def relayed() -> bool:
        return await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == 0

    await wait_for(relayed, timeout=15)
    records = await read_all(topic, count=at_least)
    await asyncio.sleep(0.5)  # nothing more is on its way: the outbox is empty
    return await read_all(topic, count=len(records))


async def test_status_changes_are_published_keyed_by_tenant_in_order_from_the_outbox(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    topic, sent_ids = await sent_with_events(daemon_factory, smtp_sink, db, kafka, per_tenant=4)
    records = await everything_relayed(topic, db, at_least=len(sent_ids) * 2)

    changes: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    last_id: dict[str, int] = {}
    for record in records:
        value = orjson.loads(record.value)
        tenant = record.key.decode()
        assert value["tenant_id"] == tenant == sent_ids[value["notification_id"]]
        assert value["type"] == "notification.status_changed"
        partitions[tenant].add(record.partition)
        assert value["event_id"] > last_id.get(tenant, 0)  # in order per key
        last_id[tenant] = value["event_id"]
        changes[value["notification_id"]].append(value["status"])
    assert set(changes) == set(sent_ids)
    for statuses in changes.values():
        assert statuses[0] == "queued"
        assert statuses[-1] == "sent"
        assert "sending" in statuses
        assert all(a != b for a, b in itertools.pairwise(statuses))
    assert all(len(p) == 1 for p in partitions.values())  # a tenant's events: one partition


async def test_a_change_that_commits_after_a_later_captured_one_still_gets_a_higher_event_id(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    database_url: str,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """Promise: a tenant's `event_id`s only grow on the topic, so a consumer that drops what
    it has seen by the highest `event_id` drops nothing new, also when two of the tenant's
    changes commit in the opposite order to the one they were captured in (outbox ids are
    taken at insert, not at commit)."""
    topic, sent_ids = await sent_with_events(daemon_factory, smtp_sink, db, kafka, per_tenant=2)
    await everything_relayed(topic, db, at_least=len(sent_ids) * 2)
    first, second = [n for n, tenant in sent_ids.items() if tenant == TENANTS[0]]
    deliver = "UPDATE notifications SET status = 'delivered' WHERE id = $1::uuid"
    slow = await asyncpg.connect(database_url)
    try:
        async with slow.transaction():
            await slow.execute(deliver, first)  # captured first: the lower outbox id
            await db.execute(deliver, second)  # captured second, committed (and relayed) first

            async def second_relayed() -> bool:
                left = "SELECT count(*) FROM delivery_events_outbox WHERE notification_id = $1"
                return await db.fetchval(left, uuid.UUID(second)) == 0

            await wait_for(second_relayed, timeout=30)
    finally:
        await slow.close()
    records = await everything_relayed(topic, db, at_least=len(sent_ids) * 2 + 2)

    delivered: dict[str, int] = {}
    last_id: dict[str, int] = {}
    for record in records:
        value = orjson.loads(record.value)
        tenant = record.key.decode()
        assert value["event_id"] > last_id.get(tenant, 0)  # a consumer's "highest seen" works
        last_id[tenant] = value["event_id"]
        if value["status"] == "delivered":
            delivered[value["notification_id"]] = value["event_id"]
    assert set(delivered) == {first, second}
    assert delivered[first] > delivered[second]  # numbered in the order it could be seen


async def test_rows_a_stopped_relay_numbered_go_out_first_with_the_same_event_id(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """Promise (at least once): rows a relay numbered but did not see acknowledged before it
    stopped are published by the next relay, first and with the `event_id` they had, so a
    consumer deduplicates them; they are not left behind in the outbox."""
    last = await db.fetchval("SELECT last_seq FROM delivery_events_relay")
    left: list[tuple[str, uuid.UUID, str, str, int]] = [
        (TENANTS[0], uuid.uuid4(), "email", "queued", last - 1),
        (TENANTS[0], uuid.uuid4(), "email", "sent", last),
    ]
    await db.executemany(
        "INSERT INTO delivery_events_outbox (tenant_id, notification_id, channel, status, seq)"
        " VALUES ($1, $2, $3, $4, $5)",
        left,
    )
    topic, sent_ids = await sent_with_events(daemon_factory, smtp_sink, db, kafka, per_tenant=1)
    records = await everything_relayed(topic, db, at_least=len(sent_ids) * 2 + len(left))
    mine = [orjson.loads(r.value) for r in records if r.key.decode() == TENANTS[0]]
    assert [(v["notification_id"], v["event_id"]) for v in mine[: len(left)]] == [
        (str(row[1]), row[4]) for row in left
    ]
    assert all(v["event_id"] > last for v in mine[len(left) :])


async def test_without_the_topic_no_status_change_is_captured(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory()
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": "u-1", "message": "Hi"},
            role="service",
        )
        assert status == 202, body
    assert await db.fetchval("SELECT enabled FROM delivery_events_switch") is False
    assert await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == 0
