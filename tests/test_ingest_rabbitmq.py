"""Domain events from RabbitMQ: a real private broker (one per session), daemons, PostgreSQL,
Redis and SMTP.

Promises checked (each test names its own): a message on the queue becomes an email that
arrives and an in-app notification, and is acknowledged only then; a duplicate message makes
one set of notifications; the same event id in two tenants makes two; a malformed message
(bad JSON, a missing tenant_id, an unknown channel or template key) is copied to the
dead-letter stream with the reason and acknowledged (not requeued forever), and the messages
behind it are delivered; two instances on one queue make no duplicates; after the broker
restarts, consumption resumes by itself.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from tests.conftest import DaemonFactory
from tests.helpers import base_env, run_cli, wait_for
from tests.rabbitmq_server import RabbitMqServer, find_rabbitmq_server
from tests.smtp_sink import SmtpSink
from tests.test_ingest_redis import (
    TENANT_A,
    TENANT_B,
    all_sent,
    arrived,
    dead_letters,
    event,
    put_templates,
    rows_of,
    start,
)

_queues = itertools.count(1)


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMqServer]:
    if find_rabbitmq_server() is None:
        pytest.skip("rabbitmq-server is not installed (bash scripts/bootstrap.sh installs it)")
    server = RabbitMqServer(Path(tmp_path_factory.mktemp("rabbitmq")))
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def queue() -> str:
    """A queue of this test's own: nothing left over from another test is consumed."""
    return f"notifyd.test.{next(_queues)}"


def broker_env(rabbitmq: RabbitMqServer, queue: str) -> dict[str, str]:
    return {
        # reconnect quickly after the broker restarts (aio-pika reads it from the URL)
        "NOTIFYD_RABBITMQ_URL": f"{rabbitmq.url}?reconnect_interval=0.5",
        "NOTIFYD_RABBITMQ_QUEUE": queue,
        "NOTIFYD_RABBITMQ_PREFETCH": "8",
    }


async def start_with_broker(
    daemon_factory: DaemonFactory,
    sink: SmtpSink,
    rabbitmq: RabbitMqServer,
    queue: str,
    **env: str,
) -> Daemon:
    return await start(daemon_factory, sink, **broker_env(rabbitmq, queue), **env)


async def publish(
    rabbitmq: RabbitMqServer,
    queue: str,
    *bodies: Mapping[str, Any] | bytes,
    user_id: str | None = None,
) -> None:
    """What another service does: a persistent JSON message to the durable queue. With
    `user_id`, the AMQP `user_id` property (the broker checks it: a publisher can only name
    the user it connected as)."""
    connection = await aio_pika.connect(rabbitmq.url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for body in bodies:
            raw = body if isinstance(body, bytes) else orjson.dumps(body)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    raw,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    user_id=user_id,
                ),
                routing_key=queue,
            )
    finally:
        await connection.close()


async def waiting_in(rabbitmq: RabbitMqServer, queue: str) -> int:
    """Messages ready in the queue (unacknowledged ones count once their consumer is gone)."""
    connection = await aio_pika.connect(rabbitmq.url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count
    finally:
        await connection.close()


async def delivered_all(rabbitmq: RabbitMqServer, queue: str) -> None:
    """Nothing is waiting in the queue any more: every message reached a consumer."""

    async def empty() -> bool:
        return await waiting_in(rabbitmq, queue) == 0

    await wait_for(empty)


async def consuming(daemon: Daemon) -> None:
    """The RabbitMQ actor is up (it declared the queue and consumes)."""
    supervisor = daemon.supervisor
    assert supervisor is not None

    async def up() -> bool:
        return supervisor.status().get("ingest:rabbitmq") == "running"

    await wait_for(up)


async def test_a_message_becomes_an_email_that_arrives_and_an_in_app_notification(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: an event from RabbitMQ is stored and delivered exactly as one from the
    Redis stream, and its message is acknowledged once the notifications are committed."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await put_templates(daemon, TENANT_A)
    await publish(rabbitmq, queue, event())
    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    assert mail.message["Subject"] == "We received your application for Backend Engineer"
    await all_sent(db, 2)
    assert [r["channel"] for r in await rows_of(db, TENANT_A)] == ["email", "in_app"]
    source = await db.fetchval("SELECT source FROM ingested_events WHERE event_id = 'evt-1'")
    assert source == "rabbitmq"
    await daemon.stop()
    assert await waiting_in(rabbitmq, queue) == 0  # acknowledged, not returned on close


async def test_a_duplicate_message_makes_one_set_of_notifications(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: deduplication by (tenant, event id), here for a publisher that sent one
    event three times (two of them possibly in flight at once, with prefetch 8)."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await put_templates(daemon, TENANT_A)
    await publish(rabbitmq, queue, event(), event(), event())
    await arrived(smtp_sink, 1)
    await all_sent(db, 2)

    await delivered_all(rabbitmq, queue)
    await daemon.stop()
    assert await waiting_in(rabbitmq, queue) == 0
    assert len(smtp_sink.received) == 1
    assert await db.fetchval("SELECT count(*) FROM notifications") == 2


async def test_the_same_event_id_in_two_tenants_makes_two_sets(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await put_templates(daemon, TENANT_A)
    await put_templates(daemon, TENANT_B)
    await publish(rabbitmq, queue, event("evt-9", TENANT_A), event("evt-9", TENANT_B))
    await arrived(smtp_sink, 2)
    await all_sent(db, 4)
    assert len(await rows_of(db, TENANT_A)) == 2
    assert len(await rows_of(db, TENANT_B)) == 2


async def test_malformed_messages_are_dead_lettered_acknowledged_and_the_queue_keeps_flowing(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: a malformed message is copied to the dead-letter stream with a reason
    naming the field and acknowledged, so it neither blocks the queue nor comes back; the
    good message behind it is delivered."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await put_templates(daemon, TENANT_A)
    bad: list[tuple[Mapping[str, Any] | bytes, str]] = [
        (b"{not json", "event: is not valid JSON"),
        ({k: v for k, v in event("e1").items() if k != "tenant_id"}, "tenant_id: is required"),
        (event("e2", channels=["email", "carrier-pigeon"]), "unknown channel 'carrier-pigeon'"),
        (event("e3", template_key="nope"), "unknown template_key 'nope'"),
    ]
    await publish(rabbitmq, queue, *[body for body, _ in bad], event("good"))

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    letters = await dead_letters(redis, len(bad))
    assert all(x["source"] == "rabbitmq" and x["queue"] == queue for x in letters)
    # `notifyd dlq requeue` replays them on the events stream
    assert all(x["stream"] == "notifyd:events" and x["group"] == "ingest" for x in letters)
    reason_of = {x["f:event"].encode(): x["reason"] for x in letters}
    for body, expected in bad:
        sent = body if isinstance(body, bytes) else orjson.dumps(body)
        assert expected in reason_of[sent], (expected, reason_of[sent])
    await all_sent(db, 2)
    await daemon.stop()
    # had any been requeued (or left unacknowledged) it would be back in the queue now
    assert await waiting_in(rabbitmq, queue) == 0
    assert int(await redis.xlen("notifyd:dead")) == len(bad)
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["good"]


async def test_a_queue_its_publishers_declared_as_a_quorum_queue_is_consumed_as_it_is(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: notifyd adopts the queue a team already runs. One declared with
    arguments (here a quorum queue) is used as declared, not contradicted by notifyd's own
    declaration (which the broker would refuse)."""
    connection = await aio_pika.connect(rabbitmq.url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(
            queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
        await put_templates(daemon, TENANT_A, ("email",))
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(event(recipients=[{"email": "q@example.com"}]))),
            routing_key=declared.name,
        )
    finally:
        await connection.close()
    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["q@example.com"]
    await all_sent(db, 1)
    assert daemon.supervisor is not None
    assert daemon.supervisor.status()["ingest:rabbitmq"] == "running"


async def test_a_message_that_keeps_failing_goes_back_to_the_queue_then_to_the_dead_letters(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: a message that cannot be stored (PostgreSQL fails: here its table is
    missing) is returned to the queue and retried after a backoff, and after
    NOTIFYD_EVENT_MAX_DELIVERIES tries dead-lettered with the reason and acknowledged,
    instead of being redelivered forever; the queue then flows again."""
    daemon = await start_with_broker(
        daemon_factory,
        smtp_sink,
        rabbitmq,
        queue,
        NOTIFYD_EVENT_MAX_DELIVERIES="2",
        NOTIFYD_ACTOR_BACKOFF_CAP="0.2",
    )
    await put_templates(daemon, TENANT_A, ("email",))
    await db.execute("ALTER TABLE ingested_events RENAME TO ingested_events_away")
    try:
        await publish(rabbitmq, queue, event("stuck"))
        (letter,) = await dead_letters(redis, 1)
    finally:
        await db.execute("ALTER TABLE ingested_events_away RENAME TO ingested_events")
    assert letter["reason"] == "failed 2 times, last with UndefinedTableError"
    assert letter["deliveries"] == "2"
    assert orjson.loads(letter["f:event"])["event_id"] == "stuck"
    await publish(rabbitmq, queue, event("next", recipients=[{"email": "n@example.com"}]))
    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["n@example.com"]
    await all_sent(db, 1)
    await daemon.stop()
    assert await waiting_in(rabbitmq, queue) == 0


async def test_two_instances_on_one_queue_make_no_duplicates(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: instances share the queue and nothing doubles, even for events their
    publisher sent twice (the copies may be handled by both instances at once)."""
    first = await start_with_broker(
        daemon_factory, smtp_sink, rabbitmq, queue, NOTIFYD_INSTANCE_NAME="one"
    )
    second = await start_with_broker(
        daemon_factory, smtp_sink, rabbitmq, queue, NOTIFYD_INSTANCE_NAME="two"
    )
    await consuming(first)
    await consuming(second)
    await put_templates(first, TENANT_A, ("email",))
    count = 20
    bodies: list[Mapping[str, Any] | bytes] = []
    for n in range(count):
        body = event(f"evt-{n}", recipients=[{"email": f"person-{n}@example.com"}])
        bodies += [body, body]
    await publish(rabbitmq, queue, *bodies)
    await arrived(smtp_sink, count)
    await all_sent(db, count)
    await first.stop()
    await second.stop()
    assert await waiting_in(rabbitmq, queue) == 0
    recipients = sorted(r.rcpt_tos[0] for r in smtp_sink.received)
    assert recipients == sorted(f"person-{n}@example.com" for n in range(count))
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == count


async def test_consumption_resumes_after_the_broker_restarts(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: a broker restart needs no operator: notifyd reconnects by itself and the
    durable queue's new messages are delivered (the actor keeps running meanwhile)."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await put_templates(daemon, TENANT_A, ("email",))
    await publish(rabbitmq, queue, event("before", recipients=[{"email": "a@example.com"}]))
    await arrived(smtp_sink, 1)

    await asyncio.to_thread(rabbitmq.restart)
    await publish(rabbitmq, queue, event("after", recipients=[{"email": "b@example.com"}]))
    mails = await arrived(smtp_sink, 2, timeout=60)
    assert sorted(m.rcpt_tos[0] for m in mails) == ["a@example.com", "b@example.com"]
    await all_sent(db, 2)
    assert daemon.supervisor is not None
    assert daemon.supervisor.status()["ingest:rabbitmq"] == "running"


async def test_an_instance_started_while_the_broker_is_down_consumes_once_it_is_up(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: boot order does not matter. Without a broker the actor fails to connect
    and the supervisor retries it with backoff (the daemon serves meanwhile); once the broker
    is up it consumes."""
    await asyncio.to_thread(rabbitmq.stop)
    try:
        # retries every 0.5 s at most: a broker slow to boot (over 10 s on a loaded machine)
        # must not exhaust the restart budget meant for a crashing actor
        daemon = await start_with_broker(
            daemon_factory,
            smtp_sink,
            rabbitmq,
            queue,
            NOTIFYD_ACTOR_BACKOFF_CAP="0.5",
            NOTIFYD_ACTOR_MAX_RESTARTS="1000",
        )
        assert daemon.supervisor is not None
        registry = daemon.metrics.registry

        async def retried() -> bool:
            restarts = registry.get_sample_value(
                "notifyd_actor_restarts_total", {"actor": "ingest:rabbitmq"}
            )
            return (restarts or 0) >= 1

        await wait_for(retried)
        await put_templates(daemon, TENANT_A, ("email",))
    finally:
        await asyncio.to_thread(rabbitmq.start)
    await publish(rabbitmq, queue, event(recipients=[{"email": "late@example.com"}]))
    (mail,) = await arrived(smtp_sink, 1, timeout=30)
    assert mail.rcpt_tos == ["late@example.com"]
    await all_sent(db, 1)


async def test_a_dead_lettered_message_is_replayed_by_dlq_requeue_once_its_template_exists(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,
    queue: str,
    database_url: str,
    redis_url: str,
) -> None:
    """The promise: a dead letter keeps the event as published, so once the cause is fixed
    (here: the tenant's admin adds the template) `notifyd dlq requeue` replays it, through
    the events stream (the same schema, deduplicated the same way)."""
    daemon = await start_with_broker(daemon_factory, smtp_sink, rabbitmq, queue)
    await publish(rabbitmq, queue, event("evt-late"))
    (letter,) = await dead_letters(redis, 1)
    assert "unknown template_key" in letter["reason"]

    await put_templates(daemon, TENANT_A)
    done = await asyncio.to_thread(
        run_cli, "dlq", "requeue", "--all", env=base_env(database_url, redis_url)
    )
    assert done.returncode == 0, done.stderr
    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    await all_sent(db, 2)
    assert await db.fetchval("SELECT source FROM ingested_events") == "redis"
    assert int(await redis.xlen("notifyd:dead")) == 0


async def test_a_message_beyond_the_queues_binding_is_dead_lettered_and_nothing_stored(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise (issue 24, "ingestion is bound to tenants"): a queue bound to TEN-A
    cannot send as TEN-B, nor `critical` when not allowed; each such message is copied to
    the dead-letter stream with the reason (and the fields every RabbitMQ dead letter has),
    acknowledged, and nothing is stored for it; the allowed message behind them is
    delivered. The binding is per source: the Redis stream's (TEN-B here) does not open
    the queue."""
    daemon = await start_with_broker(
        daemon_factory,
        smtp_sink,
        rabbitmq,
        queue,
        NOTIFYD_RABBITMQ_TENANTS=TENANT_A,
        NOTIFYD_RABBITMQ_ALLOW_CRITICAL="false",
        NOTIFYD_EVENTS_TENANTS=TENANT_B,
    )
    await put_templates(daemon, TENANT_A)
    await put_templates(daemon, TENANT_B)
    other_tenant = event("as-b", TENANT_B)
    critical = event("urgent", critical=True)
    await publish(rabbitmq, queue, other_tenant, critical, event("good"))

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    letters = await dead_letters(redis, 2)
    assert all(x["source"] == "rabbitmq" and x["queue"] == queue for x in letters)
    assert all(x["deliveries"] == "1" for x in letters)
    reason_of = {x["f:event"].encode(): x["reason"] for x in letters}
    assert reason_of[orjson.dumps(other_tenant)] == (
        "tenant_id: the rabbitmq source may not publish for tenant 'TEN-B' "
        "(not in NOTIFYD_RABBITMQ_TENANTS)"
    )
    assert reason_of[orjson.dumps(critical)] == (
        "critical: the rabbitmq source may not send critical events "
        "(NOTIFYD_RABBITMQ_ALLOW_CRITICAL is false)"
    )
    await all_sent(db, 2)
    await daemon.stop()
    assert await waiting_in(rabbitmq, queue) == 0  # acknowledged, not requeued
    assert await rows_of(db, TENANT_B) == []
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["good"]


async def test_each_broker_user_publishes_only_for_its_own_tenants(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    rabbitmq: RabbitMqServer,
    queue: str,
) -> None:
    """The promise: with NOTIFYD_RABBITMQ_USER_TENANTS, the tenants a message may be for
    follow the broker user that published it (its AMQP user_id, which the broker checks: a
    publisher cannot name another user); a message of that user for another tenant, or one
    without a user_id, is dead-lettered with the reason and nothing is stored for it."""
    daemon = await start_with_broker(
        daemon_factory,
        smtp_sink,
        rabbitmq,
        queue,
        NOTIFYD_RABBITMQ_USER_TENANTS=f"guest={TENANT_A};svc-other=*",
    )
    await put_templates(daemon, TENANT_A)
    await put_templates(daemon, TENANT_B)
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        # guest cannot pass itself off as the user that may publish for every tenant
        await publish(rabbitmq, queue, event("forged", TENANT_B), user_id="svc-other")
    theirs, anonymous = event("theirs", TENANT_B), event("anonymous")
    await publish(rabbitmq, queue, theirs, user_id="guest")
    await publish(rabbitmq, queue, anonymous)
    await publish(rabbitmq, queue, event("mine"), user_id="guest")

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    letters = await dead_letters(redis, 2)
    reason_of = {x["f:event"].encode(): x["reason"] for x in letters}
    assert reason_of[orjson.dumps(theirs)] == (
        "tenant_id: RabbitMQ user 'guest' may not publish for tenant 'TEN-B' "
        "(not in its NOTIFYD_RABBITMQ_USER_TENANTS list)"
    )
    assert reason_of[orjson.dumps(anonymous)].startswith(
        "user_id: the message has no AMQP user_id property"
    )
    await all_sent(db, 2)
    await daemon.stop()
    assert await waiting_in(rabbitmq, queue) == 0
    assert await rows_of(db, TENANT_B) == []
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["mine"]
