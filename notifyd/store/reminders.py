"""Interview reminders: rows in PostgreSQL are the truth the timer wheel is rebuilt from."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from notifyd.store.pool import Conn, Executor

COLUMNS = """id, tenant_id, application_id, candidate_id, employer_id, created_by,
    interview_time, reminder_time, status, details, notification_ids, fired_at, late,
    lateness_ms, created_at, updated_at"""

INSERT = f"""
INSERT INTO interview_reminders (id, tenant_id, application_id, candidate_id, employer_id,
                                 created_by, interview_time, reminder_time, details)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING {COLUMNS}
"""

GET = f"SELECT {COLUMNS} FROM interview_reminders WHERE tenant_id = $1 AND id = $2"

LIST_FOR_USER = f"""
SELECT {COLUMNS} FROM interview_reminders
WHERE tenant_id = $1
  AND (candidate_id = $2 OR employer_id = $2 OR created_by = $2)
  AND ($3::uuid IS NULL OR id < $3)
  AND ($4::text IS NULL OR status = $4)
  AND ($5::text IS NULL OR application_id = $5)
ORDER BY id DESC
LIMIT $6
"""

LIST_FOR_TENANT = f"""
SELECT {COLUMNS} FROM interview_reminders
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR id < $2)
  AND ($3::text IS NULL OR status = $3)
  AND ($4::text IS NULL OR application_id = $4)
ORDER BY id DESC
LIMIT $5
"""

# The status guard makes reschedule and cancel race-safe against the timer firing it.
RESCHEDULE = f"""
UPDATE interview_reminders
SET interview_time = $3, reminder_time = $4, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'scheduled'
RETURNING {COLUMNS}
"""

CANCEL = f"""
UPDATE interview_reminders SET status = 'cancelled', updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'scheduled'
RETURNING {COLUMNS}
"""


@dataclass(frozen=True, slots=True)
class NewReminder:
    id: uuid.UUID
    tenant_id: str
    application_id: str
    candidate_id: str
    employer_id: str
    created_by: str
    interview_time: datetime
    reminder_time: datetime
    details: dict[str, Any]


async def insert(conn: Conn, row: NewReminder) -> asyncpg.Record:
    record = await conn.fetchrow(
        INSERT,
        row.id,
        row.tenant_id,
        row.application_id,
        row.candidate_id,
        row.employer_id,
        row.created_by,
        row.interview_time,
        row.reminder_time,
        row.details,
    )
    assert record is not None
    return record


async def get(conn: Executor, tenant_id: str, reminder_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(GET, tenant_id, reminder_id)


async def list_visible(
    conn: Executor,
    tenant_id: str,
    user_id: str | None,
    *,
    before: uuid.UUID | None,
    status: str | None,
    application_id: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """`user_id=None` lists the whole tenant (services and admins)."""
    if user_id is None:
        return await conn.fetch(LIST_FOR_TENANT, tenant_id, before, status, application_id, limit)
    return await conn.fetch(
        LIST_FOR_USER, tenant_id, user_id, before, status, application_id, limit
    )


async def reschedule(
    conn: Conn,
    tenant_id: str,
    reminder_id: uuid.UUID,
    interview_time: datetime,
    reminder_time: datetime,
) -> asyncpg.Record | None:
    return await conn.fetchrow(RESCHEDULE, tenant_id, reminder_id, interview_time, reminder_time)


async def cancel(conn: Conn, tenant_id: str, reminder_id: uuid.UUID) -> asyncpg.Record | None:
    return await conn.fetchrow(CANCEL, tenant_id, reminder_id)


# Fire once: only a still-scheduled reminder whose due time is the one the wheel entry was
# for ($4; an entry left from before a move to a later time is stale and matches nothing);
# a reminder whose interview already began is `skipped`, not sent.
FIRE = f"""
UPDATE interview_reminders
SET status = CASE WHEN interview_time <= now() THEN 'skipped' ELSE 'fired' END,
    fired_at = now(), updated_at = now(),
    lateness_ms = GREATEST(0, EXTRACT(EPOCH FROM (now() - reminder_time)) * 1000)::int,
    late = now() - reminder_time > make_interval(secs => $3)
WHERE tenant_id = $1 AND id = $2 AND status = 'scheduled'
  AND reminder_time <= $4
RETURNING {COLUMNS}
"""

SET_NOTIFICATIONS = """
UPDATE interview_reminders SET notification_ids = $3 WHERE tenant_id = $1 AND id = $2
"""

# Keyset pages over every scheduled reminder, for rebuilding the wheel from PostgreSQL.
SCHEDULED_PAGE = """
SELECT tenant_id, id, reminder_time FROM interview_reminders
WHERE status = 'scheduled' AND (reminder_time, id) > ($1, $2)
ORDER BY reminder_time, id
LIMIT $3
"""

OVERDUE = """
SELECT tenant_id, id, reminder_time FROM interview_reminders
WHERE status = 'scheduled' AND reminder_time < now() - make_interval(secs => $1)
ORDER BY reminder_time
LIMIT $2
"""


async def fire(
    conn: Conn, tenant_id: str, reminder_id: uuid.UUID, late_after: float, due: datetime
) -> asyncpg.Record | None:
    """The reminder, now `fired` or `skipped`; None when the entry (for `due`) is stale or
    the reminder is no longer scheduled."""
    return await conn.fetchrow(FIRE, tenant_id, reminder_id, late_after, due)


async def set_notifications(
    conn: Conn, tenant_id: str, reminder_id: uuid.UUID, ids: list[uuid.UUID]
) -> None:
    await conn.execute(SET_NOTIFICATIONS, tenant_id, reminder_id, ids)


async def scheduled_page(
    executor: Executor, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    start_time, start_id = after or (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    return await executor.fetch(SCHEDULED_PAGE, start_time, start_id, limit)


async def overdue(executor: Executor, older_than: float, limit: int) -> list[asyncpg.Record]:
    return await executor.fetch(OVERDUE, older_than, limit)
