"""Retention in PostgreSQL: the housekeeper deletes rows past their family's retention, in a
final state only, in small batches, and nothing that referred to a deleted row breaks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import asyncpg
import pytest

from notifyd.actors.housekeeper import Housekeeper, Retention
from notifyd.metrics import Metrics
from notifyd.providers.sms import status_callback_url
from notifyd.settings import Settings
from notifyd.store import notifications
from notifyd.store import retention as kept
from notifyd.store.pool import close_pool, create_pool
from tests.conftest import DaemonFactory
from tests.twilio_standin import post_signed

TENANT = "TEN-0001"
DAY = 86_400.0
OLD, RECENT = 100 * DAY, 1 * DAY  # ages of the rows made below; retention is 30 days
THIRTY_DAYS = Retention(
    notifications=30 * DAY, messages=30 * DAY, reminders=30 * DAY, audit=30 * DAY, pause=0
)


def uuid7_at(age: float, n: int) -> uuid.UUID:
    """A UUIDv7 made `age` seconds ago (n tells apart ids of the same millisecond)."""
    ms = int((time.time() - age) * 1000)
    return uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | n)


@pytest.fixture
async def pool(settings_factory: Callable[..., Settings]) -> AsyncIterator[asyncpg.Pool]:
    opened = await create_pool(settings_factory(), queue=True)
    try:
        yield opened
    finally:
        await close_pool(opened)


async def add_notifications(
    db: asyncpg.Connection, age: float, statuses: list[str], channel: str = "in_app"
) -> list[uuid.UUID]:
    ids = [uuid7_at(age, n) for n in range(len(statuses))]
    await db.executemany(
        """INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body,
                                      status, created_at)
           VALUES ($1, $2, 'backend', $3, '+14155550123', 'hello', $4,
                   now() - make_interval(secs => $5))""",
        [(i, TENANT, channel, status, age) for i, status in zip(ids, statuses, strict=True)],
    )
    return ids


async def add_others(db: asyncpg.Connection, age: float, count: int) -> None:
    """`count` messages, audit rows and ingested event ids, and one reminder of each final
    state and a scheduled one, all made `age` seconds ago."""
    for n in range(count):
        await db.execute(
            """INSERT INTO messages (id, tenant_id, sender_id, receiver_id, content, sent_at)
               VALUES ($1, $2, 'alice', 'bob', 'hi', now() - make_interval(secs => $3))""",
            uuid7_at(age, n),
            TENANT,
            age,
        )
        await db.execute(
            """INSERT INTO audit_log (id, tenant_id, action, created_at)
               VALUES ($1, $2, 'notification.send', now() - make_interval(secs => $3))""",
            uuid7_at(age, n),
            TENANT,
            age,
        )
        await db.execute(
            """INSERT INTO ingested_events (tenant_id, event_id, event_type, source, received_at)
               VALUES ($1, $2, 'x', 'redis', now() - make_interval(secs => $3))""",
            TENANT,
            f"e-{age}-{n}",
            age,
        )
    for n, status in enumerate(["fired", "skipped", "cancelled", "scheduled"]):
        await db.execute(
            """INSERT INTO interview_reminders (id, tenant_id, application_id, candidate_id,
                   employer_id, created_by, interview_time, reminder_time, status)
               VALUES ($1, $2, 'app', 'cand', 'emp', 'backend',
                       now() - make_interval(secs => $3) + interval '1 hour',
                       now() - make_interval(secs => $3), $4)""",
            uuid7_at(age, 100 + n),
            TENANT,
            age,
            status,
        )


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = ["notifications", "messages", "interview_reminders", "audit_log", "ingested_events"]
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in tables}


async def test_expired_rows_of_every_family_are_deleted_and_younger_ones_kept(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise: past NOTIFYD_RETAIN_* (and NOTIFYD_EVENT_DEDUPE_TTL for ingested event ids)
    the housekeeper deletes notifications, messages, reminders, audit rows and event ids;
    rows younger than their retention stay; the deletions are counted per table."""
    final = ["sent", "delivered", "failed", "undelivered", "suppressed", "cancelled"]
    await add_notifications(db, OLD, final)
    kept_ids = await add_notifications(db, RECENT, final)
    await add_others(db, OLD, 5)
    await add_others(db, RECENT, 3)
    metrics = Metrics()
    housekeeper = Housekeeper(
        pool, ttl=DAY, interval=60, event_ttl=30 * DAY, retention=THIRTY_DAYS, metrics=metrics
    )
    deleted = await housekeeper.purge_expired()
    assert deleted == {
        "notifications": 6,
        "messages": 5,
        "interview_reminders": 3,  # fired, skipped, cancelled: not the scheduled one
        "audit_log": 5,
    }
    assert await housekeeper.forget_old_events() == 5
    assert await counts(db) == {
        "notifications": 6,
        "messages": 3,
        "interview_reminders": 4 + 1,
        "audit_log": 3,
        "ingested_events": 3,
    }
    left = await db.fetch("SELECT id FROM notifications")
    assert sorted(r["id"] for r in left) == sorted(kept_ids)
    purged = metrics.retention_purged
    assert purged.labels("notifications")._value.get() == 6
    assert purged.labels("ingested_events")._value.get() == 5


async def test_work_still_to_deliver_is_kept_however_old(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise: only rows in a final state are deleted: a queued, dispatched, sending or
    retrying notification older than its retention stays, as does a scheduled reminder."""
    in_flight = await add_notifications(db, OLD, ["queued", "dispatched", "sending", "retrying"])
    await add_notifications(db, OLD, ["sent"] * 3)
    await add_others(db, OLD, 0)
    deleted = await Housekeeper(pool, ttl=DAY, interval=60, retention=THIRTY_DAYS).purge_expired()
    assert deleted == {"notifications": 3, "interview_reminders": 3}
    left = await db.fetch("SELECT id FROM notifications")
    assert sorted(r["id"] for r in left) == sorted(in_flight)
    assert await db.fetchval("SELECT status FROM interview_reminders") == "scheduled"


async def test_zero_keeps_a_family_forever(pool: asyncpg.Pool, db: asyncpg.Connection) -> None:
    """Promise: a retention of 0 keeps that family's rows, whatever their age."""
    await add_notifications(db, OLD, ["sent"] * 2)
    await add_others(db, OLD, 2)
    keep_audit = Retention(notifications=30 * DAY, audit=0.0, pause=0)
    deleted = await Housekeeper(
        pool, ttl=DAY, interval=60, event_ttl=0.0, retention=keep_audit
    ).purge_expired()
    assert deleted == {"notifications": 2}
    left = await counts(db)
    assert (left["audit_log"], left["messages"], left["ingested_events"]) == (2, 2, 2)


async def test_one_statement_never_deletes_more_than_the_batch(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise: each DELETE removes at most NOTIFYD_RETAIN_BATCH rows (short locks, short
    transactions); the purge goes on batch after batch until nothing expired is left."""
    expired = await add_notifications(db, OLD, ["sent"] * 30)
    cut = kept.cutoff(30 * DAY)
    first = await notifications.purge_expired(pool, kept.NIL, cut, 7)
    assert first.deleted == 7
    assert first.last == sorted(expired, key=lambda i: i.int)[6]  # the oldest first
    assert await db.fetchval("SELECT count(*) FROM notifications") == 23
    retention = Retention(notifications=30 * DAY, batch=7, pause=0)
    deleted = await Housekeeper(pool, ttl=DAY, interval=60, retention=retention).purge_expired()
    assert deleted == {"notifications": 23}
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


async def test_one_instance_purges_a_family_at_a_time(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise: housekeepers of several instances do not fight or add up: while one purges a
    family (its advisory lock), another skips that family and moves on; the lock is released
    when the purge ends, and two running at once delete every expired row exactly once."""
    await add_notifications(db, OLD, ["sent"] * 200)
    await add_others(db, OLD, 2)
    retention = Retention(notifications=30 * DAY, audit=30 * DAY, batch=10, pause=0)
    family = kept.FAMILIES.index("notifications")
    assert await db.fetchval(kept.TRY_LOCK, kept.LOCK_CLASS, family)  # "another instance"
    skipped = await Housekeeper(pool, ttl=DAY, interval=60, retention=retention).purge_expired()
    assert skipped == {"audit_log": 2}
    assert await db.fetchval("SELECT count(*) FROM notifications") == 200
    await db.execute(kept.UNLOCK, kept.LOCK_CLASS, family)
    both = await asyncio.gather(
        *(
            Housekeeper(pool, ttl=DAY, interval=60, retention=retention).purge_expired()
            for _ in "ab"
        )
    )
    assert sorted(d.get("notifications", 0) for d in both) == [0, 200]
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::oid"
    assert await db.fetchval(held, kept.LOCK_CLASS) == 0


async def test_a_late_callback_for_a_deleted_notification_is_answered_as_for_an_unknown_id(
    daemon_factory: DaemonFactory, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise: deleting a notification breaks nothing that refers to it: a Twilio status
    callback arriving after the purge finds no row and gets the answer an unknown id gets."""
    sid, auth_token, public = "AC" + "3" * 32, "retention-test-token", "https://n.example.com"
    daemon = await daemon_factory(
        TWILIO_ACCOUNT_SID=sid, TWILIO_AUTH_TOKEN=auth_token, NOTIFYD_PUBLIC_URL=public
    )
    [purged] = await add_notifications(db, OLD, ["sent"], channel="sms")
    await Housekeeper(pool, ttl=DAY, interval=60, retention=THIRTY_DAYS).purge_expired()
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0

    async def callback(session: aiohttp.ClientSession, notification_id: uuid.UUID) -> int:
        url = status_callback_url(public, TENANT, str(notification_id))
        form = {"AccountSid": sid, "MessageSid": "SM" + "a" * 32, "MessageStatus": "delivered"}
        local = url.replace(public, f"http://127.0.0.1:{daemon.port}")
        return await post_signed(session, local, form, auth_token, signed_url=url)

    async with aiohttp.ClientSession() as session:
        unknown = await callback(session, uuid7_at(0, 1))
        assert await callback(session, purged) == unknown == 204


async def add_run(db: asyncpg.Connection, age: float, n: int, statuses: list[str]) -> uuid.UUID:
    """A workflow run triggered `age` seconds ago with one step of each status."""
    run_id = uuid7_at(age, 200 + n)
    await db.execute(
        """INSERT INTO workflow_runs (id, tenant_id, workflow_key, recipient, definition, data,
                                      created_by, starts_at, created_at)
           VALUES ($1, $2, 'interview', 'cand', '{}', '{}', 'backend',
                   now() - make_interval(secs => $3), now() - make_interval(secs => $3))""",
        run_id,
        TENANT,
        age,
    )
    await db.executemany(
        """INSERT INTO workflow_steps (run_id, position, tenant_id, channel, template_key,
                                       due_at, status)
           VALUES ($1, $2, $3, 'in_app', 't', now() - make_interval(secs => $4), $5)""",
        [(run_id, p, TENANT, age, status) for p, status in enumerate(statuses)],
    )
    return run_id


async def test_finished_workflow_runs_are_deleted_with_their_steps_never_one_still_pending(
    pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    """Promise (issue 27): past NOTIFYD_RETAIN_WORKFLOW_RUNS a run none of whose steps is
    pending (sent, skipped, failed, cancelled, throttled) goes with its steps; a run with a
    step still pending stays however old, as does a younger finished one."""
    await add_run(db, OLD, 0, ["sent", "skipped", "failed"])
    await add_run(db, OLD, 1, ["cancelled", "cancelled"])
    await add_run(db, OLD, 2, ["throttled"])
    waiting = await add_run(db, OLD, 3, ["sent", "pending"])
    young = await add_run(db, RECENT, 4, ["sent"])
    retention = Retention(workflow_runs=30 * DAY, pause=0)
    deleted = await Housekeeper(pool, ttl=DAY, interval=60, retention=retention).purge_expired()
    assert deleted == {"workflow_runs": 3}
    left = await db.fetch("SELECT id FROM workflow_runs")
    assert sorted(r["id"] for r in left) == sorted([waiting, young])
    steps = await db.fetch("SELECT DISTINCT run_id FROM workflow_steps")
    assert sorted(r["run_id"] for r in steps) == sorted([waiting, young])
