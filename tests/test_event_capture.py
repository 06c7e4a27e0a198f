"""The capture of notification and message events in PostgreSQL (migration 0017), statement
by statement, against the real database.

The REST and dispatcher paths write many rows per statement (a group commit of sends is one
INSERT; a dispatcher batch is one UPDATE), so the promises are checked on multi-row
statements of several tenants:
- Every event-worthy row of a statement gets its event, once per subscribed endpoint of its
  own tenant, never another tenant's (tenants never see each other); a disabled endpoint or
  an unsubscribed event gets nothing.
- Only what changed is an event: an update that changes neither the status nor the read mark
  (a lease renewal, a read mark set again) captures nothing.
- Nothing accepted is lost: the Kafka outbox receives every status change while its switch
  is on, in the transaction of the change: a rolled back statement leaves no event behind.
- Capture runs only while something consumes it (migration 0018): an endpoint or the Kafka
  switch turns its tables' triggers on in its own transaction; only the housekeeper turns them
  off, serialised with endpoint changes so an endpoint committed meanwhile is never missed,
  and never holding a busy table's writes past its lock timeout.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import asyncpg
import pytest

from notifyd.actors.housekeeper import Housekeeper
from notifyd.store import webhooks

A, B = "TEN-A", "TEN-B"


async def endpoint(
    db: asyncpg.Connection, tenant: str, events: list[str], *, enabled: bool = True
) -> uuid.UUID:
    endpoint_id = uuid.uuid4()
    await db.execute(
        "INSERT INTO webhook_endpoints (id, tenant_id, url, events, secret_enc, enabled) "
        "VALUES ($1, $2, 'https://hooks.example.com/in', $3, 'sealed', $4)",
        endpoint_id,
        tenant,
        events,
        enabled,
    )
    return endpoint_id


async def insert_in_one_statement(db: asyncpg.Connection, tenants: list[str]) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in tenants]
    await db.execute(
        "INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient, body) "
        "SELECT id, tenant, 'svc', 'user-1', 'in_app', 'user-1', 'hello' "
        "FROM unnest($1::uuid[], $2::text[]) AS t (id, tenant)",
        ids,
        tenants,
    )
    return ids


async def deliveries(db: asyncpg.Connection) -> Counter[tuple[uuid.UUID, str]]:
    rows = await db.fetch("SELECT endpoint_id, event_type FROM webhook_deliveries")
    return Counter((row["endpoint_id"], row["event_type"]) for row in rows)


async def test_each_row_of_a_statement_gets_its_tenants_events_once(db: asyncpg.Connection) -> None:
    mine = await endpoint(db, A, ["notification.queued", "notification.read"])
    theirs = await endpoint(db, B, ["notification.queued"])
    await endpoint(db, A, ["notification.queued"], enabled=False)
    ids = await insert_in_one_statement(db, [A, A, A, B, B])
    assert await deliveries(db) == {
        (mine, "notification.queued"): 3,
        (theirs, "notification.queued"): 2,
    }
    data = await db.fetch(
        "SELECT tenant_id, data->>'notification_id' AS id FROM webhook_deliveries "
        "WHERE endpoint_id = $1",
        mine,
    )
    assert {row["id"] for row in data} == {str(i) for i in ids[:3]}
    assert {row["tenant_id"] for row in data} == {A}

    await db.execute("UPDATE notifications SET read_at = now()")  # all five, one statement
    assert (await deliveries(db))[(mine, "notification.read")] == 3
    assert (await deliveries(db))[(theirs, "notification.read")] == 0  # not subscribed

    before = await deliveries(db)
    await db.execute("UPDATE notifications SET read_at = now(), updated_at = now()")  # again
    await db.execute("UPDATE notifications SET attempts = attempts + 1")  # no status change
    assert await deliveries(db) == before


async def test_status_changes_reach_the_outbox_and_webhooks_in_their_transaction(
    db: asyncpg.Connection,
) -> None:
    await db.execute("UPDATE delivery_events_switch SET enabled = true")
    mine = await endpoint(db, A, ["notification.sent", "notification.suppressed"])
    ids = await insert_in_one_statement(db, [A, A, B])
    await db.execute(
        "UPDATE notifications SET status = CASE WHEN id = $1 THEN 'suppressed' ELSE 'sent' END",
        ids[0],
    )
    await db.execute("UPDATE notifications SET status = status")  # unchanged: no event
    outbox = await db.fetch(
        "SELECT notification_id, tenant_id, status FROM delivery_events_outbox ORDER BY id"
    )
    assert Counter(row["status"] for row in outbox) == {"queued": 3, "sent": 2, "suppressed": 1}
    assert {(row["notification_id"], row["tenant_id"]) for row in outbox} == {
        (ids[0], A),
        (ids[1], A),
        (ids[2], B),
    }
    assert await deliveries(db) == {
        (mine, "notification.sent"): 1,
        (mine, "notification.suppressed"): 1,
    }

    before_outbox = await db.fetchval("SELECT count(*) FROM delivery_events_outbox")
    before = await deliveries(db)
    transaction = db.transaction()
    await transaction.start()
    await insert_in_one_statement(db, [A])
    await db.execute("UPDATE notifications SET status = 'failed'")
    await transaction.rollback()
    assert await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == before_outbox
    assert await deliveries(db) == before

    await db.execute("UPDATE delivery_events_switch SET enabled = false")
    await insert_in_one_statement(db, [B])
    assert await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == before_outbox


async def test_each_message_of_a_statement_gets_its_tenants_event(db: asyncpg.Connection) -> None:
    mine = await endpoint(db, A, ["message.created"])
    theirs = await endpoint(db, B, ["message.created", "notification.queued"])
    await db.execute(
        "INSERT INTO messages (id, tenant_id, sender_id, receiver_id, content) "
        "SELECT gen_random_uuid(), tenant, 'ann', 'bob', 'hi' "
        "FROM unnest($1::text[]) AS t (tenant)",
        [A, A, B],
    )
    assert await deliveries(db) == {(mine, "message.created"): 2, (theirs, "message.created"): 1}


NOTIFICATION_CAPTURE = {"notifications_events_inserted", "notifications_events_updated"}
CAPTURE = NOTIFICATION_CAPTURE | {
    "messages_events_inserted",
    "interview_reminders_webhook_events",
    "workflow_steps_webhook_events",
}


async def capturing(db: asyncpg.Connection) -> set[str]:
    """The capture triggers switched on."""
    rows = await db.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgname = ANY ($1) AND tgenabled <> 'D'",
        list(CAPTURE),
    )
    return {row["tgname"] for row in rows}


async def test_capture_runs_only_while_something_consumes_it(db: asyncpg.Connection) -> None:
    assert await capturing(db) == set()  # a fresh deployment: no endpoint, no Kafka topic
    await endpoint(db, A, ["message.created"])
    assert await capturing(db) == {"messages_events_inserted"}
    await endpoint(db, B, ["reminder.fired"], enabled=False)
    assert await capturing(db) == {"messages_events_inserted"}
    sent = await endpoint(db, B, ["notification.sent"])
    assert await capturing(db) == {"messages_events_inserted"} | NOTIFICATION_CAPTURE
    ids = await insert_in_one_statement(db, [B])
    await db.execute("UPDATE notifications SET status = 'sent' WHERE id = $1", ids[0])
    assert await deliveries(db) == {(sent, "notification.sent"): 1}

    # turning endpoints off leaves capture on until the housekeeper's round
    await db.execute("UPDATE webhook_endpoints SET enabled = false")
    assert await capturing(db) == {"messages_events_inserted"} | NOTIFICATION_CAPTURE
    assert await webhooks.trim_event_capture(db, 1.0) == 3
    assert await capturing(db) == set()
    assert await webhooks.trim_event_capture(db, 1.0) == 0

    # the Kafka outbox wants every notification's status change, whatever the endpoints
    await db.execute("UPDATE delivery_events_switch SET enabled = true")
    assert await capturing(db) == NOTIFICATION_CAPTURE
    assert await webhooks.trim_event_capture(db, 1.0) == 0
    await insert_in_one_statement(db, [A])
    assert await db.fetchval("SELECT count(*) FROM delivery_events_outbox") == 1


async def test_an_endpoint_committed_while_capture_is_turned_off_is_not_missed(
    db: asyncpg.Connection, database_url: str
) -> None:
    """The housekeeper turning capture off while a tenant creates an endpoint: it waits for
    the endpoint's transaction, then sees the endpoint and leaves capture on."""
    await endpoint(db, A, ["notification.queued"], enabled=False)  # on, and nothing wants it
    await db.execute("UPDATE webhook_endpoints SET enabled = true")
    await db.execute("UPDATE webhook_endpoints SET enabled = false")
    assert await capturing(db) == NOTIFICATION_CAPTURE
    creator = await asyncpg.connect(database_url)
    try:
        transaction = creator.transaction()
        await transaction.start()
        created = await endpoint(creator, B, ["notification.queued"])
        trim = asyncio.create_task(webhooks.trim_event_capture(db, 10.0))
        blocked = await asyncpg.connect(database_url)
        try:
            for _ in range(200):
                waiting = await blocked.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid <> pg_backend_pid()"
                )
                if waiting or trim.done():
                    break
                await asyncio.sleep(0.01)
        finally:
            await blocked.close()
        await transaction.commit()
        assert await trim == 0
    finally:
        await creator.close()
    assert await capturing(db) == NOTIFICATION_CAPTURE
    await insert_in_one_statement(db, [B])
    assert await deliveries(db) == {(created, "notification.queued"): 1}


async def test_turning_capture_off_never_holds_a_busy_tables_writes(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A write in flight on notifications: the housekeeper gives up at its lock timeout
    (sends queue behind a waiting ALTER TABLE), leaves capture on, and turns it off on a
    later round."""
    await endpoint(db, A, ["notification.queued"])
    await db.execute("UPDATE webhook_endpoints SET enabled = false")
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    housekeeper = Housekeeper(pool, ttl=60.0, interval=60.0)
    try:
        transaction = db.transaction()
        await transaction.start()
        await insert_in_one_statement(db, [A])
        assert await housekeeper.trim_event_capture() == 0
        await transaction.rollback()
        assert await capturing(db) == NOTIFICATION_CAPTURE
        stop = asyncio.Event()
        rounds = asyncio.create_task(housekeeper.run(stop))  # its next round turns it off
        try:
            for _ in range(500):
                if not await capturing(db):
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await rounds
        assert await capturing(db) == set()
    finally:
        await pool.close()


@pytest.mark.parametrize("events", [["workflow.step"], ["reminder.fired"]])
async def test_each_event_family_turns_on_its_own_tables_capture(
    db: asyncpg.Connection, events: list[str]
) -> None:
    await endpoint(db, A, events)
    table = {"workflow.step": "workflow_steps", "reminder.fired": "interview_reminders"}
    assert await capturing(db) == {f"{table[events[0]]}_webhook_events"}
