"""1-on-1 messages between users of one tenant."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime

from notifyd.store import audit, retention
from notifyd.store.audit import AuditEntry
from notifyd.store.pool import Conn, Executor


@dataclass(frozen=True, slots=True)
class Message:
    """A stored message as the API lists it; its fields are the columns read, in order."""

    id: uuid.UUID
    sender_id: str
    receiver_id: str | None  # 1-on-1
    room_id: uuid.UUID | None  # group room
    content: str
    sent_at: datetime
    read_at: datetime | None


COLUMNS = ", ".join(f.name for f in fields(Message))

INSERT = """
INSERT INTO messages (id, tenant_id, sender_id, receiver_id, content)
VALUES ($1, $2, $3, $4, $5)
RETURNING sent_at
"""

# Many messages, 1-on-1 and group, in one statement; a group message only from a member.
INSERT_MANY = """
INSERT INTO messages (id, tenant_id, sender_id, receiver_id, room_id, content)
SELECT m.id, m.tenant_id, m.sender_id, m.receiver_id, m.room_id, m.content
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::uuid[], $6::text[])
     AS m (id, tenant_id, sender_id, receiver_id, room_id, content)
WHERE m.room_id IS NULL
   OR EXISTS (SELECT 1 FROM room_members r WHERE r.room_id = m.room_id AND r.user_id = m.sender_id)
RETURNING id, sent_at
"""

LIST_ROOM = f"""
SELECT {COLUMNS} FROM messages
WHERE room_id = $1 AND ($2::uuid IS NULL OR id < $2)
ORDER BY id DESC
LIMIT $3
"""

# Two index-ordered scans merged, so a user with a long history still pages in index order.
LIST_FOR_USER = f"""
SELECT {COLUMNS} FROM (
    (SELECT {COLUMNS} FROM messages
     WHERE tenant_id = $1 AND sender_id = $2 AND receiver_id IS NOT NULL
       AND ($3::uuid IS NULL OR id < $3)
     ORDER BY id DESC LIMIT $4)
    UNION ALL
    (SELECT {COLUMNS} FROM messages
     WHERE tenant_id = $1 AND receiver_id = $2 AND ($3::uuid IS NULL OR id < $3)
     ORDER BY id DESC LIMIT $4)
) AS both_sides
ORDER BY id DESC
LIMIT $4
"""

LIST_CONVERSATION = f"""
SELECT {COLUMNS} FROM messages
WHERE tenant_id = $1 AND receiver_id IS NOT NULL
  AND LEAST(sender_id, receiver_id) = LEAST($2::text, $3::text)
  AND GREATEST(sender_id, receiver_id) = GREATEST($2::text, $3::text)
  AND ($4::uuid IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5
"""

MARK_READ_IDS = """
UPDATE messages SET read_at = now()
WHERE tenant_id = $1 AND receiver_id = $2 AND id = ANY($3::uuid[]) AND read_at IS NULL
RETURNING sender_id, id
"""

MARK_READ_FROM = """
UPDATE messages SET read_at = now()
WHERE tenant_id = $1 AND receiver_id = $2 AND sender_id = $3 AND read_at IS NULL
  AND ($4::uuid IS NULL OR id <= $4)
RETURNING sender_id, id
"""

MARK_READ_ALL = """
UPDATE messages SET read_at = now()
WHERE tenant_id = $1 AND receiver_id = $2 AND read_at IS NULL
RETURNING sender_id, id
"""


async def insert(
    conn: Conn,
    message_id: uuid.UUID,
    tenant_id: str,
    sender_id: str,
    receiver_id: str,
    content: str,
) -> object:
    return await conn.fetchval(INSERT, message_id, tenant_id, sender_id, receiver_id, content)


async def list_for_user(
    conn: Executor,
    tenant_id: str,
    user_id: str,
    *,
    with_user: str | None,
    before: uuid.UUID | None,
    limit: int,
) -> list[Message]:
    if with_user is not None:
        rows = await conn.fetch(LIST_CONVERSATION, tenant_id, user_id, with_user, before, limit)
    else:
        rows = await conn.fetch(LIST_FOR_USER, tenant_id, user_id, before, limit)
    return [Message(*row) for row in rows]


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class NewMessage:
    id: uuid.UUID
    tenant_id: str
    sender_id: str
    receiver_id: str | None  # 1-on-1
    room_id: uuid.UUID | None  # group room
    content: str


# The same with each stored message's audit row, in one statement: one round trip and one
# statement to plan and encode per batch (an audit row only for a message that was stored).
INSERT_MANY_AUDITED = f"""
WITH stored AS ({INSERT_MANY.strip()}),
audited AS (
    INSERT INTO audit_log (id, tenant_id, user_id, action, ip_address, request_id, details)
    SELECT a.id, a.tenant_id, a.user_id, a.action, a.ip_address, a.request_id, a.details
    FROM unnest($7::uuid[], $8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::text[], $14::jsonb[])
         AS a (message_id, id, tenant_id, user_id, action, ip_address, request_id, details)
    JOIN stored ON stored.id = a.message_id
)
SELECT id, sent_at FROM stored
"""


async def insert_many_audited(
    conn: Conn, messages: Sequence[NewMessage], audits: Sequence[AuditEntry]
) -> dict[uuid.UUID, datetime]:
    """Many messages in one statement, each with its audit row (`audits[i]` for
    `messages[i]`); returns each message's stored time by id."""
    rows = await conn.fetch(
        INSERT_MANY_AUDITED,
        [m.id for m in messages],
        [m.tenant_id for m in messages],
        [m.sender_id for m in messages],
        [m.receiver_id for m in messages],
        [m.room_id for m in messages],
        [m.content for m in messages],
        [m.id for m in messages],
        *audit.as_columns(audits),
    )
    return {row["id"]: row["sent_at"] for row in rows}


async def list_room(
    conn: Executor, room_id: uuid.UUID, *, before: uuid.UUID | None, limit: int
) -> list[Message]:
    return [Message(*row) for row in await conn.fetch(LIST_ROOM, room_id, before, limit)]


async def mark_read(
    conn: Conn,
    tenant_id: str,
    receiver_id: str,
    *,
    ids: list[uuid.UUID] | None,
    from_user: str | None,
    up_to: uuid.UUID | None = None,
) -> tuple[int, dict[str, uuid.UUID]]:
    """Only messages the caller received can be marked read by the caller. Returns how many
    changed and, per sender whose messages changed, the newest one now read: what a read
    receipt tells that sender."""
    if ids is not None:
        rows = await conn.fetch(MARK_READ_IDS, tenant_id, receiver_id, ids)
    elif from_user is not None:
        rows = await conn.fetch(MARK_READ_FROM, tenant_id, receiver_id, from_user, up_to)
    else:
        rows = await conn.fetch(MARK_READ_ALL, tenant_id, receiver_id)
    newest: dict[str, uuid.UUID] = {}
    for sender, message_id in rows:
        if sender not in newest or newest[sender] < message_id:
            newest[sender] = message_id
    return len(rows), newest


# Retention: chat messages (1-on-1 and group rooms) sent before the cutoff, oldest first.
PURGE_EXPIRED = retention.purge_statement("messages", "sent_at")


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` messages older than the cutoff, after `after`. A member's
    `last_read_id` may name a deleted message: it is a position, still ordered by id."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)
