"""Domain events from Kafka: a real Apache Kafka broker (KRaft, one per session; see
tests/kafka_server.py), daemons, PostgreSQL, Redis and SMTP.

Promises checked (each test names its own): events from several partitions become
notifications once, and each partition's offset is committed past them; a malformed record
(a poison message) and records beyond the source's tenant binding are dead-lettered with the
reason and their topic, partition and offset while the rest flow; two instances in one group
split the partitions and a third joining rebalances without loss or duplicates; a broker
restart mid-stream and a broker down at start need no operator; a `kill -9` between the rows
and the offset commit re-reads the record and deduplicates it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from redis.asyncio import Redis

from notifyd.app import Daemon
from scripts.kafka import KafkaBroker
from tests.conftest import DaemonFactory
from tests.helpers import base_env, wait_for
from tests.kafka_server import kafka  # noqa: F401  (the session fixture)
from tests.smtp_sink import SmtpSink
from tests.test_ingest_redis import (
    TENANT_A,
    TENANT_B,
    dead_letters,
    event,
    put_templates,
    start,
)

_names = itertools.count(1)
ROOT = Path(__file__).resolve().parent.parent


class Topic:
    """A topic and a consumer group of this test's own: nothing left by another test."""

    def __init__(self, broker: KafkaBroker, partitions: int) -> None:
        n = next(_names)
        self.broker = broker
        self.name = f"notifyd.test.{n}"
        self.group = f"notifyd-test-{n}"
        self.partitions = partitions

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "NOTIFYD_KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            "NOTIFYD_KAFKA_TOPICS": self.name,
            "NOTIFYD_KAFKA_GROUP": self.group,
            **extra,
        }

    async def create(self) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(self.name, self.partitions, 1)])
        finally:
            await admin.close()

    async def publish(self, *bodies: Mapping[str, Any] | bytes, key: bytes | None = None) -> None:
        """What another service does: one JSON event per record, keyed by its event id (so
        the events spread over the partitions) unless `key` is given."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.broker.bootstrap, acks="all", enable_idempotence=True
        )
        await producer.start()
        try:
            for body in bodies:
                raw = body if isinstance(body, bytes) else orjson.dumps(body)
                record_key = key or _key_of(body, raw)
                await producer.send_and_wait(self.name, raw, key=record_key)
        finally:
            await producer.stop()

    async def lag(self) -> int:
        """Records published but not yet committed by the group, over every partition."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        ends = await self._ends()
        total = 0
        for tp, end in ends.items():
            done = committed.get(tp)
            total += end - (done.offset if done is not None and done.offset >= 0 else 0)
        return total

    async def members(self) -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.broker.bootstrap)
        await admin.start()
        try:
            (described,) = await admin.describe_consumer_groups([self.group])
        finally:
            await admin.close()
        group = described.groups[0]  # (error, id, state, protocol type, protocol, members, ...)
        return len(group[5])

    async def _ends(self) -> dict[TopicPartition, int]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=self.broker.bootstrap)
        await consumer.start()
        try:
            tps = [TopicPartition(self.name, p) for p in range(self.partitions)]
            ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            return ends
        finally:
            await consumer.stop()


def _key_of(body: Mapping[str, Any] | bytes, raw: bytes) -> bytes:
    return str(body["event_id"]).encode() if isinstance(body, Mapping) else raw


async def all_committed(topic: Topic, timeout: float = 30) -> None:
    async def none_left() -> bool:
        return await topic.lag() == 0

    await wait_for(none_left, timeout=timeout)


def in_app(n: int | str, tenant: str = TENANT_A) -> dict[str, Any]:
    """An event that makes one in-app notification (no SMTP round trip: fast)."""
    return event(f"evt-{n}", tenant, recipients=[{"user_id": f"user-{n}"}], channels=["in_app"])


async def stored(db: asyncpg.Connection, count: int, timeout: float = 30) -> None:
    async def enough() -> bool:
        return await db.fetchval("SELECT count(*) FROM ingested_events") >= count

    await wait_for(enough, timeout=timeout)


async def assert_each_once(db: asyncpg.Connection, ids: Sequence[str]) -> None:
    rows = await db.fetch("SELECT event_id, source, notification_ids FROM ingested_events")
    assert sorted(r["event_id"] for r in rows) == sorted(ids)
    assert {r["source"] for r in rows} == {"kafka"}
    assert await db.fetchval("SELECT count(*) FROM notifications") == len(ids)


async def consuming(daemon: Daemon) -> None:
    supervisor = daemon.supervisor
    assert supervisor is not None

    async def up() -> bool:
        return supervisor.status().get("ingest:kafka") == "running"

    await wait_for(up)


async def test_events_from_several_partitions_become_notifications_once(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: every record of every partition is stored once (one notification each,
    one `ingested_events` row with source kafka), a record published twice makes one set,
    and the group's offsets are committed past every record (nothing left to re-read)."""
    topic = Topic(kafka, partitions=3)
    await topic.create()
    daemon = await start(daemon_factory, smtp_sink, **topic.env())
    await put_templates(daemon, TENANT_A, ("in_app",))
    count = 30
    await topic.publish(*[in_app(n) for n in range(count)])
    await topic.publish(in_app(7), in_app(21))  # published twice
    await stored(db, count)
    await all_committed(topic)
    await assert_each_once(db, [f"evt-{n}" for n in range(count)])
    partitions = await db.fetchval("SELECT count(*) FROM ingested_events")
    assert partitions == count


async def test_poison_and_unbound_records_are_dead_lettered_while_the_rest_flow(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: a malformed record (bad JSON, an unknown field) and records the source
    may not publish (another tenant than NOTIFYD_KAFKA_TENANTS, `critical` when
    NOTIFYD_KAFKA_ALLOW_CRITICAL is false) are copied to the dead-letter stream with the
    reason and their topic, partition and offset; nothing is stored for them; the partition
    moves on (one partition here: the good records are behind them) and its offset is
    committed past them."""
    topic = Topic(kafka, partitions=1)
    await topic.create()
    daemon = await start(
        daemon_factory,
        smtp_sink,
        **topic.env(NOTIFYD_KAFKA_TENANTS=TENANT_A, NOTIFYD_KAFKA_ALLOW_CRITICAL="false"),
    )
    await put_templates(daemon, TENANT_A, ("in_app",))
    await put_templates(daemon, TENANT_B, ("in_app",))
    bad: list[tuple[Mapping[str, Any] | bytes, str]] = [
        (b"{not json", "event: is not valid JSON"),
        ({**in_app("x"), "chanels": ["email"]}, "chanels: is not a known field"),
        (
            in_app("as-b", TENANT_B),
            "tenant_id: the kafka source may not publish for tenant 'TEN-B' "
            "(not in NOTIFYD_KAFKA_TENANTS)",
        ),
        (
            {**in_app("urgent"), "critical": True},
            "critical: the kafka source may not send critical events "
            "(NOTIFYD_KAFKA_ALLOW_CRITICAL is false)",
        ),
    ]
    await topic.publish(in_app("first"), *[body for body, _ in bad], in_app("last"), key=b"k")

    letters = await dead_letters(redis, len(bad))
    await stored(db, 2)
    await all_committed(topic)
    await assert_each_once(db, ["evt-first", "evt-last"])
    assert all(x["source"] == "kafka" and x["topic"] == topic.name for x in letters)
    assert all(x["partition"] == "0" and x["deliveries"] == "1" for x in letters)
    # `notifyd dlq requeue` replays them on the events stream
    assert all(x["stream"] == "notifyd:events" and x["group"] == "ingest" for x in letters)
    by_body = {x["f:event"].encode(): x for x in letters}
    for offset, (body, expected) in enumerate(bad, start=1):
        sent = body if isinstance(body, bytes) else orjson.dumps(body)
        assert by_body[sent]["reason"] == expected or expected in by_body[sent]["reason"]
        assert by_body[sent]["offset"] == str(offset)
    assert (
        await db.fetchval("SELECT count(*) FROM notifications WHERE tenant_id = $1", TENANT_B) == 0
    )


async def test_two_instances_split_partitions_and_a_third_joining_loses_and_doubles_nothing(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: two instances share a topic's partitions; a third joins mid-stream and the
    group rebalances; every event is stored exactly once (no partition left behind, none read
    twice into rows) and every offset is committed."""
    topic = Topic(kafka, partitions=6)
    await topic.create()
    first = await start(daemon_factory, smtp_sink, **topic.env(NOTIFYD_INSTANCE_NAME="one"))
    second = await start(daemon_factory, smtp_sink, **topic.env(NOTIFYD_INSTANCE_NAME="two"))
    await put_templates(first, TENANT_A, ("in_app",))
    await consuming(first)
    await consuming(second)
    await topic.publish(*[in_app(n) for n in range(0, 40)])
    await stored(db, 20)
    third = await start(daemon_factory, smtp_sink, **topic.env(NOTIFYD_INSTANCE_NAME="three"))
    await topic.publish(*[in_app(n) for n in range(40, 80)])
    await consuming(third)
    await topic.publish(*[in_app(n) for n in range(80, 120)])
    await stored(db, 120, timeout=60)
    await all_committed(topic, timeout=60)
    await assert_each_once(db, [f"evt-{n}" for n in range(120)])
    assert await topic.members() == 3  # the third did join the group


async def test_a_broker_restart_mid_stream_needs_no_operator(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: the broker restarts while events flow; the consumer reconnects by itself,
    the events published before and after are each stored once and committed."""
    topic = Topic(kafka, partitions=2)
    await topic.create()
    daemon = await start(daemon_factory, smtp_sink, **topic.env())
    await put_templates(daemon, TENANT_A, ("in_app",))
    await topic.publish(*[in_app(n) for n in range(10)])
    await stored(db, 10)
    await asyncio.to_thread(kafka.restart)
    await topic.publish(*[in_app(n) for n in range(10, 20)])
    await stored(db, 20, timeout=90)
    await all_committed(topic, timeout=60)
    await assert_each_once(db, [f"evt-{n}" for n in range(20)])
    assert daemon.supervisor is not None
    assert daemon.supervisor.status()["ingest:kafka"] == "running"


async def test_an_instance_started_while_the_broker_is_down_consumes_once_it_is_up(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: boot order does not matter: without a broker the actor fails to start and
    the supervisor retries it with backoff (the daemon serves meanwhile)."""
    topic = Topic(kafka, partitions=1)
    await topic.create()
    await asyncio.to_thread(kafka.stop)
    try:
        daemon = await start(
            daemon_factory,
            smtp_sink,
            **topic.env(NOTIFYD_ACTOR_BACKOFF_CAP="0.5", NOTIFYD_ACTOR_MAX_RESTARTS="1000"),
        )
        registry = daemon.metrics.registry

        async def retried() -> bool:
            restarts = registry.get_sample_value(
                "notifyd_actor_restarts_total", {"actor": "ingest:kafka"}
            )
            return (restarts or 0) >= 1

        await wait_for(retried, timeout=60)
        await put_templates(daemon, TENANT_A, ("in_app",))
    finally:
        await asyncio.to_thread(kafka.start)
    await topic.publish(in_app("late"))
    await stored(db, 1, timeout=60)
    await all_committed(topic)
    await assert_each_once(db, ["evt-late"])


# A notifyd that dies by `kill -9` at the worst moment: its rows are committed, the offset not.
_KILLED_BEFORE_COMMIT = """
import os, signal, sys
from notifyd.ingest import kafka_source

async def die(self, consumer, handled):
    os.kill(os.getpid(), signal.SIGKILL)

kafka_source.KafkaEventSource._commit = die
from notifyd.cli import main
sys.exit(main(["serve"]))
"""


async def test_a_kill_9_between_the_rows_and_the_offset_commit_rereads_and_deduplicates(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    kafka: KafkaBroker,  # noqa: F811
    database_url: str,
    redis_url: str,
) -> None:
    """The promise: offsets are committed only after the rows, so a `kill -9` in between
    leaves the records to be read again; the next instance reads them, finds their
    `ingested_events` rows and makes nothing twice; then the offsets are committed."""
    topic = Topic(kafka, partitions=1)
    await topic.create()
    daemon = await start(daemon_factory, smtp_sink, **topic.env())
    await put_templates(daemon, TENANT_A, ("in_app",))
    await daemon.stop()

    await topic.publish(*[in_app(n) for n in range(5)])
    env = {**os.environ, **base_env(database_url, redis_url, **topic.env())}
    victim = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_BEFORE_COMMIT,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            _, stderr = await victim.communicate()
    finally:
        if victim.returncode is None:
            victim.kill()
            await victim.wait()
    assert victim.returncode == -signal.SIGKILL, stderr.decode(errors="replace")[-3000:]
    await assert_each_once(db, [f"evt-{n}" for n in range(5)])  # the rows are there...
    assert await topic.lag() == 5  # ...and no offset was committed

    await start(daemon_factory, smtp_sink, **topic.env())
    await all_committed(topic)
    await assert_each_once(db, [f"evt-{n}" for n in range(5)])


async def test_a_failing_record_is_retried_then_dead_lettered_and_the_partition_moves_on(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    kafka: KafkaBroker,  # noqa: F811
) -> None:
    """The promise: a record that cannot be stored (PostgreSQL fails: here its table is
    missing) is retried in place with a backoff, not skipped, and after
    NOTIFYD_EVENT_MAX_DELIVERIES tries dead-lettered with the reason; the partition then
    moves on and its offset is committed past it."""
    topic = Topic(kafka, partitions=1)
    await topic.create()
    daemon = await start(
        daemon_factory,
        smtp_sink,
        **topic.env(NOTIFYD_EVENT_MAX_DELIVERIES="3", NOTIFYD_ACTOR_BACKOFF_CAP="0.2"),
    )
    await put_templates(daemon, TENANT_A, ("in_app",))
    await db.execute("ALTER TABLE ingested_events RENAME TO ingested_events_away")
    try:
        await topic.publish(in_app("stuck"), key=b"k")
        (letter,) = await dead_letters(redis, 1)
    finally:
        await db.execute("ALTER TABLE ingested_events_away RENAME TO ingested_events")
    assert letter["reason"] == "failed 3 times, last with UndefinedTableError"
    assert (letter["deliveries"], letter["offset"]) == ("3", "0")
    assert orjson.loads(letter["f:event"])["event_id"] == "evt-stuck"
    await topic.publish(in_app("next"), key=b"k")
    await stored(db, 1)
    await all_committed(topic)
    await assert_each_once(db, ["evt-next"])
