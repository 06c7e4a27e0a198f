"""Crash recovery: the promise "nothing accepted is lost", and "Redis can be rebuilt".

Every test runs real daemons against real PostgreSQL, Redis and an aiosmtpd SMTP server, and
breaks something on the way: a row committed but never put on a stream, Redis flushed or
restarted under a running daemon, a consumer that died holding an entry, a malformed entry, a
second instance competing for the same work. Each ends with every notification delivered,
exactly once where the SMTP server can count.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.ids import uuid7
from notifyd.keys import Keys
from notifyd.payloads import DeliveryRef
from scripts.localservers import RedisServer
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink

TENANT = "TEN-0001"
INTENTS = "notifyd:intents"
DEAD = "notifyd:dead"
DELIVER_EMAIL = "notifyd:deliver:email"
DELIVER_INAPP = "notifyd:deliver:in_app"
TIMER = "notifyd:timer"

# Small delivery settings: fast retries, a short lease, a sweeper that looks often.
FAST: dict[str, str] = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
    "NOTIFYD_ACTOR_BACKOFF_CAP": "0.5",
}
# Retries far enough out (1.5-3 s) that Redis can lose the wheel before any of them fires.
SLOW_RETRY: dict[str, str] = {"NOTIFYD_RETRY_BASE": "3", "NOTIFYD_RETRY_CAP": "3"}

INSERT = """
INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient, subject, body,
                           status, attempts, claimed_at, updated_at)
VALUES ($1, $2, 'backend', $3, $4, $5, $6, $7, $8, $10,
        CASE WHEN $10 > 0 THEN now() - make_interval(secs => $11) END,
        now() - make_interval(secs => $9))
"""


def email_env(sink: SmtpSink, **env: str) -> dict[str, str]:
    return {**FAST, "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(sink.port), **env}


async def insert_row(
    db: asyncpg.Connection,
    *,
    channel: str = "in_app",
    status: str = "queued",
    age: float = 60.0,
    recipient: str = "auth0|42",
    claimed: float | None = None,
) -> uuid.UUID:
    """A notification row written straight to PostgreSQL, as if its XADD never happened;
    `claimed` (seconds ago) makes it a sender's claim: one attempt, `claimed_at` then."""
    notification_id = uuid7()
    user_id = recipient if channel == "in_app" else None
    subject = "Stranded" if channel == "email" else None
    await db.execute(
        INSERT,
        notification_id,
        TENANT,
        user_id,
        channel,
        recipient,
        subject,
        "A notification whose stream entry was lost.",
        status,
        age,
        0 if claimed is None else 1,
        claimed or 0.0,
    )
    return notification_id


async def send_email(api: Api, n: int) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {
            "notification_type": "email",
            "subject": f"Update {n}",
            "message": f"Your application moved forward ({n}).",
            "recipient": f"candidate{n}@example.com",
        },
        role="service",
    )
    assert status == 202, body
    return str(body["notification_id"])


async def statuses(db: asyncpg.Connection, ids: list[str]) -> dict[str, str]:
    rows = await db.fetch(
        "SELECT id::text, status FROM notifications WHERE id = ANY($1::uuid[])", ids
    )
    return {r["id"]: r["status"] for r in rows}


async def wait_all(
    db: asyncpg.Connection, ids: list[str], status: str, timeout: float = 20
) -> None:
    async def reached() -> bool:
        found = await statuses(db, ids)
        return len(found) == len(ids) and set(found.values()) == {status}

    try:
        await wait_for(reached, timeout=timeout)
    except AssertionError:
        raise AssertionError(
            f"not all {status} within {timeout}s: {Counter((await statuses(db, ids)).values())}"
        ) from None


def assert_each_once(sink: SmtpSink, ids: list[str]) -> None:
    counts = Counter(r.notifyd_id for r in sink.received)
    duplicates = {i: c for i, c in counts.items() if c > 1}
    assert not duplicates, f"delivered more than once: {duplicates}"
    assert set(counts) == set(ids)


async def test_row_committed_but_never_enqueued_is_swept_and_delivered(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: a row still `queued` past NOTIFYD_REQUEUE_AFTER (the process died between
    the commit and the XADD) is re-enqueued by the sweeper and delivered."""
    await daemon_factory(**FAST)
    notification_id = await insert_row(db, channel="in_app", status="queued", age=60)
    assert await redis.xlen(INTENTS) == 0
    await wait_all(db, [str(notification_id)], "sent", timeout=10)
    row = await db.fetchrow("SELECT attempts FROM notifications WHERE id = $1", notification_id)
    assert row is not None and row["attempts"] == 1


async def in_feed(redis: Redis, user_id: str, notification_id: str) -> int:
    """How many live events on the user's feed name this notification."""
    entries: Any = await redis.xrange(Keys("notifyd").user_history(TENANT, user_id))
    return sum(notification_id.encode() in b"".join(fields.values()) for _, fields in entries)


async def test_rows_stranded_dispatched_or_sending_without_a_stream_entry_are_delivered(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: nothing accepted is lost. A row the dispatcher moved to `dispatched` whose
    delivery entry never made it (the process died before its XADD, or Redis dropped the
    stream), or one a sender claimed (`sending`) and died with while its entry was trimmed
    away, has nothing left in Redis to bring it back: the sweeper puts it on its channel's
    delivery stream after NOTIFYD_REQUEUE_AFTER, a sender takes the dead claim over after
    the lease, and each is delivered: the emails arrive once, the in-app events are on the
    users' feeds."""
    stranded = {
        "email-dispatched": await insert_row(
            db, channel="email", status="dispatched", recipient="a@example.com"
        ),
        "email-sending": await insert_row(
            db, channel="email", status="sending", recipient="b@example.com", claimed=60
        ),
        "inapp-dispatched": await insert_row(
            db, channel="in_app", status="dispatched", recipient="user-d"
        ),
        "inapp-sending": await insert_row(
            db, channel="in_app", status="sending", recipient="user-s", claimed=60
        ),
    }
    ids = [str(i) for i in stranded.values()]
    # no stream holds them: only PostgreSQL knows they are owed
    assert await redis.keys("notifyd:*") == []
    await daemon_factory(**email_env(smtp_sink))
    await wait_all(db, ids, "sent", timeout=12)
    await asyncio.to_thread(smtp_sink.wait_for, 2)
    assert_each_once(smtp_sink, [str(stranded["email-dispatched"]), str(stranded["email-sending"])])
    assert await in_feed(redis, "user-d", str(stranded["inapp-dispatched"])) == 1
    assert await in_feed(redis, "user-s", str(stranded["inapp-sending"])) == 1
    attempts = dict(
        await db.fetch(
            "SELECT id::text, attempts FROM notifications WHERE id = ANY($1::uuid[])", ids
        )
    )
    # the dead claim counted as one attempt, the takeover as the next
    assert attempts == {
        str(stranded["email-dispatched"]): 1,
        str(stranded["email-sending"]): 2,
        str(stranded["inapp-dispatched"]): 1,
        str(stranded["inapp-sending"]): 2,
    }


async def send_email_and_wait(api: Api, db: asyncpg.Connection, sink: SmtpSink) -> str:
    notification_id = await send_email(api, 1)
    await wait_all(db, [notification_id], "sent", timeout=15)
    await asyncio.to_thread(sink.wait_for, 1)
    return notification_id


async def drained(redis: Redis, stream: str, group: str) -> None:
    """Every entry of `stream` read by `group` and acknowledged."""

    async def done() -> bool:
        groups: Any = await redis.xinfo_groups(stream)
        found = [g for g in groups if g["name"] in (group, group.encode())]
        return bool(found) and found[0]["lag"] == 0 and found[0]["pending"] == 0

    await wait_for(done, timeout=15)


async def test_a_delivery_entry_replayed_after_the_send_sends_nothing_more(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: at-least-once inside, idempotent at the edges. Entries come back (the
    sweeper re-adds rows waiting in a backlog, XAUTOCLAIM hands out a slow peer's entry, an
    operator replays a stream): the sender's claim in PostgreSQL (`WHERE status …`) is what
    keeps a `sent` email from going out again."""
    daemon = await daemon_factory(**email_env(smtp_sink))
    async with Api(daemon) as api:
        notification_id = await send_email_and_wait(api, db, smtp_sink)
    ref = DeliveryRef(TENANT, notification_id)
    for _ in range(3):
        await redis.xadd(DELIVER_EMAIL, ref.to_fields())  # type: ignore[arg-type]
    await drained(redis, DELIVER_EMAIL, "send")  # read, handled and acknowledged
    assert len(smtp_sink.received) == 1
    row = await db.fetchrow(
        "SELECT status, attempts FROM notifications WHERE id = $1", uuid.UUID(notification_id)
    )
    assert row is not None and (row["status"], row["attempts"]) == ("sent", 1)


async def test_a_live_senders_claim_is_left_alone_until_its_lease_ends(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: at-least-once, with duplicates bounded. A row another sender claimed a moment
    ago (`sending`, fresh `claimed_at`) is not sent a second time while that claim is live:
    its entry is deferred and stays pending. Once the claim is older than NOTIFYD_CLAIM_IDLE
    (the claimant died mid-send) the row is taken over and the email goes out."""
    # one sender slot: entries are handled in order, so once the marker is sent the held
    # delivery's entry (added before it) has been handled; a lease far longer than that
    daemon = await daemon_factory(
        **email_env(smtp_sink, NOTIFYD_EMAIL_CONCURRENCY="1", NOTIFYD_CLAIM_IDLE="60")
    )
    held = await insert_row(
        db, channel="email", status="sending", recipient="held@example.com", age=0, claimed=0
    )
    entry = await redis.xadd(DELIVER_EMAIL, DeliveryRef(TENANT, str(held)).to_fields())  # type: ignore[arg-type]
    async with Api(daemon) as api:
        await send_email_and_wait(api, db, smtp_sink)
    # handled before the marker, deferred: still pending, not acknowledged
    assert await redis.xpending_range(DELIVER_EMAIL, "send", min=entry, max=entry, count=1)
    assert smtp_sink.messages_to("held@example.com") == []
    row = await db.fetchrow("SELECT status, attempts FROM notifications WHERE id = $1", held)
    assert row is not None and (row["status"], row["attempts"]) == ("sending", 1)
    # the claimant never finishes: once its claim is past the lease (aged here rather than
    # waited for), the sweeper puts the row back and a sender takes it over
    await db.execute(
        "UPDATE notifications SET claimed_at = now() - interval '2 minutes', "
        "updated_at = now() - interval '2 minutes' WHERE id = $1",
        held,
    )
    await wait_all(db, [str(held)], "sent", timeout=15)
    assert len(smtp_sink.messages_to("held@example.com")) == 1


async def _retrying_then_flushed(
    daemon: Daemon, sink: SmtpSink, db: asyncpg.Connection, redis: Redis, n: int
) -> list[str]:
    """Send `n` emails the SMTP server turns away once (421), wait until all are `retrying`
    (their retries on the wheel), then FLUSHALL: streams, groups and the wheel are gone."""
    sink.fail_next(n, "421 Service not available, try again later")
    async with Api(daemon) as api:
        ids = [await send_email(api, i) for i in range(n)]
    await wait_all(db, ids, "retrying", timeout=15)
    assert await redis.zcard(TIMER) == n
    await redis.flushall()
    # nothing was sent before the flush: every retry is now known only to PostgreSQL
    assert sink.received == []
    assert set((await statuses(db, ids)).values()) == {"retrying"}
    return ids


async def test_redis_flushed_under_a_running_daemon_every_retry_is_still_delivered_once(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: PostgreSQL is the source of truth; when Redis loses the streams, the groups
    and the retry wheel, the sweeper puts the work back and each email arrives once."""
    n = 5
    daemon = await daemon_factory(**email_env(smtp_sink, **SLOW_RETRY))
    ids = await _retrying_then_flushed(daemon, smtp_sink, db, redis, n)
    await wait_all(db, ids, "sent", timeout=20)
    await asyncio.to_thread(smtp_sink.wait_for, n)
    assert_each_once(smtp_sink, ids)
    attempts = await db.fetch("SELECT attempts FROM notifications WHERE id = ANY($1::uuid[])", ids)
    assert {r["attempts"] for r in attempts} == {2}


async def test_daemon_started_after_a_flush_rebuilds_retries_from_postgresql(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: on start, pending retries Redis lost are rebuilt from PostgreSQL (not only
    by the periodic sweep: NOTIFYD_REQUEUE_AFTER is far out here)."""
    n = 5
    # the sweeper never steps in before the test's deadline: only the start-up rebuild can
    slow_sweep = {"NOTIFYD_REQUEUE_AFTER": "300"}
    first = await daemon_factory(**email_env(smtp_sink, **SLOW_RETRY, **slow_sweep))
    ids = await _retrying_then_flushed(first, smtp_sink, db, redis, n)
    await first.stop()

    await daemon_factory(**email_env(smtp_sink, **slow_sweep))
    await wait_all(db, ids, "sent", timeout=15)
    await asyncio.to_thread(smtp_sink.wait_for, n)
    assert_each_once(smtp_sink, ids)


async def test_entry_of_a_dead_consumer_is_taken_over_with_xautoclaim(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: work a crashed consumer read but never acknowledged is taken over after
    NOTIFYD_CLAIM_IDLE by a live instance, and delivered."""
    notification_id = await insert_row(db, channel="in_app", status="dispatched", age=0)
    await redis.xgroup_create(DELIVER_INAPP, "send", id="0", mkstream=True)
    ref = DeliveryRef(TENANT, str(notification_id))
    entry_id = await redis.xadd(DELIVER_INAPP, ref.to_fields())  # type: ignore[arg-type]
    read: Any = await redis.xreadgroup("send", "ghost", {DELIVER_INAPP: ">"}, count=1)
    assert read[0][1][0][0] == entry_id
    ghost_pending = await redis.xpending_range(
        DELIVER_INAPP, "send", min="-", max="+", count=10, consumername="ghost"
    )
    assert [p["message_id"] for p in ghost_pending] == [entry_id]

    async def idle_past_lease() -> bool:
        [pending] = await redis.xpending_range(
            DELIVER_INAPP, "send", min="-", max="+", count=1, consumername="ghost"
        )
        return int(pending["time_since_delivered"]) > 1100

    # idle past NOTIFYD_CLAIM_IDLE=1 already, so the start-up XAUTOCLAIM takes it
    await wait_for(idle_past_lease, timeout=5)
    # the sweeper is kept out of it: only XAUTOCLAIM can recover the entry
    await daemon_factory(
        **{
            **FAST,
            "NOTIFYD_CLAIM_IDLE": "1",
            "NOTIFYD_SEND_TIMEOUT": "0.5",
            "NOTIFYD_REQUEUE_AFTER": "300",
        }
    )
    await wait_all(db, [str(notification_id)], "sent", timeout=10)

    async def acked() -> bool:
        summary: Any = await redis.xpending(DELIVER_INAPP, "send")
        return int(summary["pending"]) == 0

    await wait_for(acked, timeout=5)
    assert (
        await redis.xpending_range(
            DELIVER_INAPP, "send", min="-", max="+", count=10, consumername="ghost"
        )
        == []
    )
    assert await redis.xlen(DELIVER_INAPP) == 1  # taken over, not re-enqueued by the sweeper


@pytest.mark.parametrize(
    "fields",
    [
        {"v": "1", "data": "not json"},
        {"v": "9", "data": '{"tenant_id": "TEN-0001", "notification_id": "x"}'},
        {"garbage": "entry"},
    ],
    ids=["not-json", "unknown-version", "no-fields"],
)
async def test_poison_intent_is_dead_lettered_and_does_not_block_the_queue(
    daemon_factory: DaemonFactory,
    db: asyncpg.Connection,
    redis: Redis,
    fields: dict[str, str],
) -> None:
    """Promise: an entry that can never be handled goes to the dead-letter stream with a
    reason, and the notifications behind it are still delivered."""
    daemon = await daemon_factory(**FAST)
    poison_id = await redis.xadd(INTENTS, fields)  # type: ignore[arg-type]
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": "auth0|42", "message": "Still here"},
            role="service",
        )
    assert status == 202
    await wait_all(db, [body["notification_id"]], "sent", timeout=10)

    async def dead_lettered() -> bool:
        return bool(await redis.xlen(DEAD))

    await wait_for(dead_lettered, timeout=10)
    entries: Any = await redis.xrange(DEAD)
    [(_, dead)] = entries
    assert dead[b"stream"] == INTENTS.encode()
    assert dead[b"entry"] == poison_id
    assert dead[b"reason"]
    for key, value in fields.items():
        assert dead[b"f:" + key.encode()] == value.encode()
    summary: Any = await redis.xpending(INTENTS, "dispatch")
    assert int(summary["pending"]) == 0  # acknowledged: it cannot come back


async def test_two_instances_share_a_burst_without_duplicates(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: several instances on one Redis and PostgreSQL share the work; nothing is
    sent twice and nothing is lost."""
    n = 200
    env = email_env(smtp_sink, NOTIFYD_EMAIL_CONCURRENCY="4")
    alpha = await daemon_factory(**env, NOTIFYD_INSTANCE_NAME="alpha")
    beta = await daemon_factory(**env, NOTIFYD_INSTANCE_NAME="beta")
    async with Api(alpha) as api_a, Api(beta) as api_b:
        apis = [api_a, api_b]
        ids: list[str] = []
        for start in range(0, n, 20):  # bursts of 20 concurrent requests, half to each
            ids += await asyncio.gather(
                *(send_email(apis[i % 2], i) for i in range(start, start + 20))
            )
    await wait_all(db, ids, "sent", timeout=60)
    await asyncio.to_thread(smtp_sink.wait_for, n, 30)
    assert_each_once(smtp_sink, ids)
    assert len(smtp_sink.received) == n

    def sent_by(daemon: Daemon) -> float:
        value = daemon.metrics.registry.get_sample_value(
            "notifyd_deliveries_total", {"channel": "email", "outcome": "sent"}
        )
        return value or 0.0

    by_instance = {"alpha": sent_by(alpha), "beta": sent_by(beta)}
    assert sum(by_instance.values()) == n, by_instance
    assert all(by_instance.values()), f"one instance did all the work: {by_instance}"
    consumers: Any = await redis.xinfo_consumers(DELIVER_EMAIL, "send")
    names = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers}
    assert names >= {"alpha", "beta"}


async def test_redis_restart_under_a_running_daemon_loses_nothing(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    own_redis: RedisServer,
) -> None:
    """Promise: a Redis restart is survived: the actors are restarted by the supervisor, and
    a send accepted while the connections are broken is delivered too."""
    daemon = await daemon_factory(**email_env(smtp_sink, REDIS_URL=own_redis.url(0)))
    try:
        async with Api(daemon) as api:
            first = await send_email(api, 1)
            await wait_all(db, [first], "sent", timeout=15)

            await asyncio.to_thread(own_redis.restart)
            # the request path may meet a broken connection: the row is committed, so 202
            second = await send_email(api, 2)
            await wait_all(db, [first, second], "sent", timeout=20)
        await asyncio.to_thread(smtp_sink.wait_for, 2)
        assert_each_once(smtp_sink, [first, second])
    finally:
        await daemon.stop()  # before its Redis goes away with the fixture
