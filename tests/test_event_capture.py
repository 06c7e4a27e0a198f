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
"""

from __future__ import annotations

import uuid
from collections import Counter

import asyncpg

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
