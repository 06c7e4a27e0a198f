"""Notifications table: the outbox row comes first, the stream entry after it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from notifyd.store import audit, retention
from notifyd.store.audit import AuditEntry
from notifyd.store.pool import Conn, Executor


@dataclass(frozen=True, slots=True)
class Notification:
    """A stored notification as the API shows it (`GET`, the list, a retry's answer); its
    fields are the columns read, in order."""

    id: uuid.UUID
    tenant_id: str
    created_by: str
    user_id: str | None
    channel: str
    recipient: str
    subject: str | None
    body: str | None
    html_body: str | None
    template_key: str | None
    context: dict[str, Any] | None
    locale: str | None
    category: str | None
    critical: bool
    status: str
    attempts: int
    last_error: str | None
    provider_message_id: str | None
    provider_status: str | None
    next_attempt_at: datetime | None
    read_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None


COLUMNS = ", ".join(f.name for f in fields(Notification))

LIST_FOR_USER = f"""
SELECT {COLUMNS} FROM notifications
WHERE tenant_id = $1 AND user_id = $2
  AND NOT (channel = 'in_app' AND status = 'suppressed')
  AND ($3::uuid IS NULL OR id < $3)
  AND (NOT $4::bool OR (read_at IS NULL AND channel = 'in_app'))
  AND ($5::text IS NULL OR channel = $5)
ORDER BY id DESC
LIMIT $6
"""

UNREAD_COUNT = """
SELECT count(*) FROM notifications
WHERE tenant_id = $1 AND user_id = $2 AND read_at IS NULL AND channel = 'in_app'
  AND status <> 'suppressed'
"""

GET = f"SELECT {COLUMNS} FROM notifications WHERE tenant_id = $1 AND id = $2"

MARK_READ_IDS = """
UPDATE notifications SET read_at = now(), updated_at = now()
WHERE tenant_id = $1 AND user_id = $2 AND id = ANY($3::uuid[]) AND read_at IS NULL
  AND channel = 'in_app'
"""

MARK_READ_ALL = """
UPDATE notifications SET read_at = now(), updated_at = now()
WHERE tenant_id = $1 AND user_id = $2 AND read_at IS NULL AND channel = 'in_app'
"""


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class NewNotification:
    id: uuid.UUID
    tenant_id: str
    created_by: str
    user_id: str | None
    channel: str
    recipient: str
    subject: str | None
    body: str | None
    html_body: str | None
    template_key: str | None
    context: dict[str, Any] | None
    locale: str | None
    category: str | None
    critical: bool
    idempotency_key: str | None
    request_id: str | None


NEW_COLUMNS = ", ".join(f.name for f in fields(NewNotification))  # what an insert writes

# Rows and their audit rows in one statement (one send, or a group commit of concurrent ones):
# one round trip, one statement to plan, arrays encoded once, no BEGIN/COMMIT of our own.
INSERT_MANY_AUDITED = f"""
WITH stored AS (
    INSERT INTO notifications ({NEW_COLUMNS})
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::jsonb[], $12::text[], $13::text[], $14::bool[], $15::text[],
                         $16::text[])
    RETURNING 1
)
INSERT INTO audit_log (id, tenant_id, user_id, action, ip_address, request_id, details)
SELECT * FROM unnest($17::uuid[], $18::text[], $19::text[], $20::text[], $21::text[],
                     $22::text[], $23::jsonb[])
"""


async def insert_many_audited(
    executor: Executor, rows: Sequence[NewNotification], audits: Sequence[AuditEntry]
) -> None:
    """Stores the rows (`queued`) and the audit rows, all or none (one statement: inside the
    caller's transaction when it writes more there)."""
    columns = [[getattr(row, f.name) for row in rows] for f in fields(NewNotification)]
    await executor.execute(INSERT_MANY_AUDITED, *columns, *audit.as_columns(audits))


async def list_for_user(
    conn: Executor,
    tenant_id: str,
    user_id: str,
    *,
    before: uuid.UUID | None,
    unread_only: bool,
    channel: str | None,
    limit: int,
) -> list[Notification]:
    rows = await conn.fetch(LIST_FOR_USER, tenant_id, user_id, before, unread_only, channel, limit)
    return [Notification(*row) for row in rows]


async def unread_count(conn: Executor, tenant_id: str, user_id: str) -> int:
    return int(await conn.fetchval(UNREAD_COUNT, tenant_id, user_id))


async def get(conn: Executor, tenant_id: str, notification_id: uuid.UUID) -> Notification | None:
    row = await conn.fetchrow(GET, tenant_id, notification_id)
    return None if row is None else Notification(*row)


async def mark_read(conn: Conn, tenant_id: str, user_id: str, ids: list[uuid.UUID] | None) -> int:
    """Mark the caller's own in-app notifications read; `ids=None` means all of them."""
    if ids is None:
        status = await conn.execute(MARK_READ_ALL, tenant_id, user_id)
    else:
        status = await conn.execute(MARK_READ_IDS, tenant_id, user_id, ids)
    return int(status.rsplit(" ", 1)[1])


# Retention: notifications in a final state, created before the cutoff, oldest first. Never a
# queued, dispatched, sending or retrying one, however old: it is still to be delivered.
FINAL_STATUSES = (
    "sent",
    "delivered",
    "failed",
    "undelivered",
    "suppressed",
    "cancelled",
    "bounced",
)
PURGE_EXPIRED = retention.purge_statement(
    "notifications",
    "created_at",
    only="status IN (" + ", ".join(f"'{s}'" for s in FINAL_STATUSES) + ")",
)


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` final notifications older than the cutoff, after `after`. A
    late provider callback for one finds no row and is answered as for an unknown id."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)
