"""Delivery events out: notification status changes read back from a real Kafka topic.

Promises checked: with NOTIFYD_KAFKA_EVENTS_TOPIC set, every status change of every
notification (queued ... sent) is published to the topic, keyed by its tenant, each tenant's
in one partition and in the order of the changes, and the outbox is emptied once Kafka has
them; with the setting empty nothing is captured (no outbox rows to pile up).
"""

from __future__ import annotations

import asyncio
import itertools
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


async def test_status_changes_are_published_keyed_by_tenant_in_order_from_the_outbox(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    topic = Topic(kafka, partitions=3)
    await topic.create()
    daemon = await daemon_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_sink.port),
        NOTIFYD_KAFKA_BOOTSTRAP_SERVERS=kafka.bootstrap,
        NOTIFYD_KAFKA_TOPICS="",
        NOTIFYD_KAFKA_EVENTS_TOPIC=topic.name,
    )
    sent_ids: dict[str, str] = {}
    async with Api(daemon) as api:
        for tenant in TENANTS:
            for n in range(4):
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

    async def relayed() -> bool:
        return await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == 0

    await wait_for(relayed, timeout=30)
    records = await read_all(topic, count=len(sent_ids) * 2)
    await asyncio.sleep(0.5)  # nothing more is on its way: the outbox is empty
    records = await read_all(topic, count=len(records))

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
