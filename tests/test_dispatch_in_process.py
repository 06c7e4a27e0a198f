"""The outbox hands what it just committed to this process's dispatcher instead of the
intents stream (`accept.outbox.Outbox`): delivered without a stream entry; past its bound, or
when the dispatch fails, the intents go on the stream as before; a shutdown waits for it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.accept.outbox import Outbox
from notifyd.ids import uuid7
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.payloads import NotificationIntent
from notifyd.settings import Settings
from notifyd.store.audit import AuditEntry
from notifyd.store.notifications import NewNotification
from notifyd.store.pool import close_pool, create_pool
from notifyd.streams.producer import Producer
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

TENANT = "TEN-0001"
KEYS = Keys("outboxtest")


@pytest.fixture
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    created = await create_pool(settings)
    yield created
    await close_pool(created)


def order(n: int) -> tuple[NewNotification, AuditEntry]:
    row = NewNotification(
        id=uuid7(),
        tenant_id=TENANT,
        created_by="backend",
        user_id=f"user-{n}",
        channel="in_app",
        recipient=f"user-{n}",
        subject=None,
        body=f"message {n}",
        html_body=None,
        template_key=None,
        context=None,
        locale=None,
        category=None,
        critical=False,
        idempotency_key=None,
        request_id=None,
    )
    entry = AuditEntry(TENANT, "backend", "notification.send", None, None, {"n": n})
    return row, entry


async def enqueued(redis: Redis) -> list[str]:
    entries = await redis.xrange(KEYS.intents)
    return [NotificationIntent.from_fields(fields).notification_id for _, fields in entries]


def fallbacks(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "notifyd_dispatch_fallbacks_total", {"reason": reason}
    )
    return value or 0.0


def accepted(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "notifyd_notifications_accepted_total", {"channel": "in_app"}
    )
    return value or 0.0


async def test_rest_sends_are_delivered_without_an_intent_on_the_stream(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory()
    async with Api(daemon) as api:
        results = await asyncio.gather(
            *(
                api.post(
                    "/notifications/send/",
                    {"notification_type": "in_app", "recipient": f"u{n}", "message": "hi"},
                    tenant=TENANT,
                    user="backend",
                    role="service",
                )
                for n in range(60)
            )
        )
    assert {status for status, _, _ in results} == {202}

    async def all_sent() -> bool:
        sent = await db.fetchval("SELECT count(*) FROM notifications WHERE status = 'sent'")
        return int(sent) == 60

    await wait_for(all_sent, timeout=15)
    assert await redis.xlen(Keys(daemon.settings.redis_prefix).intents) == 0


async def test_a_failed_dispatch_puts_the_intents_on_the_stream(
    pool: asyncpg.Pool, redis: Redis
) -> None:
    """The rows are committed either way; a dispatch that raises (PostgreSQL or Redis gone
    mid-way) hands them to the stream, where any instance's dispatcher takes them."""

    async def failing(ids: Sequence[object]) -> None:
        raise ConnectionError("the dispatcher's connection broke")

    metrics = Metrics()
    outbox = Outbox(pool, Producer(redis, 1000), KEYS, metrics, dispatch_now=failing)
    items = [order(n) for n in range(3)]
    assert await asyncio.gather(*(outbox.put(row, entry) for row, entry in items)) == [True] * 3
    await outbox.close(5.0)
    assert sorted(await enqueued(redis)) == sorted(str(row.id) for row, _ in items)
    assert accepted(metrics) == 3  # counted once, not again by the fallback
    assert fallbacks(metrics, "failed") == 3
    stored = await pool.fetchval("SELECT count(*) FROM notifications WHERE tenant_id = $1", TENANT)
    assert stored == 3


async def test_past_its_bound_the_outbox_uses_the_stream_and_close_waits_for_the_rest(
    pool: asyncpg.Pool, redis: Redis
) -> None:
    release = asyncio.Event()
    dispatched: list[object] = []

    async def slow(ids: Sequence[object]) -> None:
        await release.wait()
        dispatched.extend(ids)

    metrics = Metrics()
    outbox = Outbox(pool, Producer(redis, 1000), KEYS, metrics, dispatch_now=slow, max_in_process=1)
    first, second = order(1), order(2)
    await outbox.put(*first)  # dispatched here, and held up
    await outbox.put(*second)  # the one slot is taken: the stream
    assert await enqueued(redis) == [str(second[0].id)]
    assert dispatched == []
    assert (fallbacks(metrics, "busy"), accepted(metrics)) == (1, 2)

    closing = asyncio.create_task(outbox.close(5.0))
    await asyncio.sleep(0.1)
    assert not closing.done()  # waits for the dispatch in flight
    release.set()
    await asyncio.wait_for(closing, timeout=5)
    assert dispatched == [(TENANT, first[0].id)]


async def test_a_close_cut_short_leaves_the_rows_for_the_sweeper(
    pool: asyncpg.Pool, redis: Redis
) -> None:
    async def stuck(ids: Sequence[object]) -> None:
        await asyncio.Event().wait()

    outbox = Outbox(pool, Producer(redis, 1000), KEYS, Metrics(), dispatch_now=stuck)
    row, entry = order(1)
    await outbox.put(row, entry)
    await asyncio.wait_for(outbox.close(0.2), timeout=5)
    status = await pool.fetchval("SELECT status FROM notifications WHERE id = $1", row.id)
    assert status == "queued"  # committed, not dispatched: what the sweeper re-enqueues
    assert await enqueued(redis) == []


async def test_after_close_a_late_commit_goes_to_the_stream(
    pool: asyncpg.Pool, redis: Redis
) -> None:
    """A request cut off by the server's shutdown timeout may still commit after the outbox
    closed: its intents go on the stream, not to a dispatch nobody would wait for."""
    dispatched: list[object] = []

    async def record(ids: Sequence[object]) -> None:
        dispatched.extend(ids)

    metrics = Metrics()
    outbox = Outbox(pool, Producer(redis, 1000), KEYS, metrics, dispatch_now=record)
    await outbox.close(1.0)
    row, entry = order(1)
    await outbox.put(row, entry)
    assert dispatched == []
    assert await enqueued(redis) == [str(row.id)]
    assert fallbacks(metrics, "closing") == 1
