"""Interview reminders: rows in PostgreSQL are the truth the timer wheel is rebuilt from."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from notifyd.store import retention
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


PEEK = f"SELECT {COLUMNS} FROM interview_reminders WHERE tenant_id = $1 AND id = $2"

# Fire once, in one statement (atomic without a transaction block, two round trips in all
# with the PEEK that planned the notifications): only a still-scheduled reminder whose due
# time is the one the wheel entry was for ($3; an entry left from before a move to a later
# time is stale) and whose interview time is the one the notifications were planned with
# ($4). A reminder whose interview began is `skipped` and makes no notifications.
FIRE = """
WITH fired AS (
    UPDATE interview_reminders
    SET status = CASE WHEN interview_time <= now() THEN 'skipped' ELSE 'fired' END,
        fired_at = now(), updated_at = now(),
        lateness_ms = GREATEST(0, EXTRACT(EPOCH FROM (now() - reminder_time)) * 1000)::int,
        late = now() - reminder_time > make_interval(secs => $5),
        notification_ids = CASE WHEN interview_time <= now() THEN '{}'::uuid[] ELSE $6 END
    WHERE tenant_id = $1 AND id = $2 AND status = 'scheduled'
      AND reminder_time <= $3 AND interview_time = $4
    RETURNING id, tenant_id, created_by, status, late, lateness_ms
), made AS (
    INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient,
                               template_key, context, locale, category, critical)
    SELECT n.id, f.tenant_id, f.created_by, n.user_id, n.channel, n.recipient, $7,
           n.context, n.locale, $8, true
    FROM fired f,
         unnest($6::uuid[], $9::text[], $10::text[], $11::text[], $12::jsonb[], $13::text[])
             AS n(id, user_id, channel, recipient, context, locale)
    WHERE f.status = 'fired'
    RETURNING id
), logged AS (
    INSERT INTO audit_log (id, tenant_id, user_id, action, details)
    SELECT $14, f.tenant_id, NULL, 'reminder.' || f.status,
           jsonb_build_object('reminder_id', f.id::text, 'late', f.late,
                              'lateness_ms', f.lateness_ms,
                              'notifications', (SELECT count(*) FROM made))
    FROM fired f
    RETURNING id
)
SELECT id, tenant_id, status, late, lateness_ms FROM fired
"""


PEEK_MANY = f"""
SELECT {COLUMNS} FROM interview_reminders
WHERE (tenant_id, id) IN (SELECT * FROM unnest($1::text[], $2::uuid[]))
"""

# The batch form of FIRE: many reminders, their notifications and audit rows in one
# statement. Notifications come as flat arrays tagged with their reminder's id. The state
# guard is `(…) IS TRUE` so that the planner probes the primary key rather than walking the
# partial due index, whatever its statistics say (see store.deliveries).
FIRE_MANY = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::timestamptz[], $4::timestamptz[],
                         $5::uuid[])
        AS i(tenant_id, id, due, interview_time, audit_id)
), nin AS (
    SELECT * FROM unnest($6::uuid[], $7::uuid[], $8::text[], $9::text[], $10::text[],
                         $11::jsonb[], $12::text[])
        AS n(reminder_id, id, user_id, channel, recipient, context, locale)
), fired AS (
    UPDATE interview_reminders r
    SET status = CASE WHEN r.interview_time <= now() THEN 'skipped' ELSE 'fired' END,
        fired_at = now(), updated_at = now(),
        lateness_ms = GREATEST(0, EXTRACT(EPOCH FROM (now() - r.reminder_time)) * 1000)::int,
        late = now() - r.reminder_time > make_interval(secs => $13),
        notification_ids = CASE WHEN r.interview_time <= now() THEN '{}'::uuid[]
            ELSE COALESCE((SELECT array_agg(n.id) FROM nin n WHERE n.reminder_id = r.id),
                          '{}'::uuid[]) END
    FROM input i
    WHERE r.tenant_id = i.tenant_id AND r.id = i.id AND (r.status = 'scheduled') IS TRUE
      AND r.reminder_time <= i.due AND r.interview_time = i.interview_time
    RETURNING r.id, r.tenant_id, r.created_by, r.status, r.late, r.lateness_ms, i.audit_id
), made AS (
    INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient,
                               template_key, context, locale, category, critical)
    SELECT n.id, f.tenant_id, f.created_by, n.user_id, n.channel, n.recipient, $14,
           n.context, n.locale, $15, true
    FROM fired f JOIN nin n ON n.reminder_id = f.id
    WHERE f.status = 'fired'
    RETURNING id
), logged AS (
    INSERT INTO audit_log (id, tenant_id, user_id, action, details)
    SELECT f.audit_id, f.tenant_id, NULL, 'reminder.' || f.status,
           jsonb_build_object(
               'reminder_id', f.id::text, 'late', f.late, 'lateness_ms', f.lateness_ms,
               'notifications', CASE WHEN f.status = 'fired'
                   THEN (SELECT count(*) FROM nin n WHERE n.reminder_id = f.id) ELSE 0 END)
    FROM fired f
    RETURNING id
)
SELECT id, tenant_id, status, late, lateness_ms FROM fired
"""


@dataclass(frozen=True, slots=True)
class DueReminder:
    """A reminder read for firing, with the due time its wheel entry was for."""

    row: asyncpg.Record
    due: datetime


@dataclass(frozen=True, slots=True)
class ReminderNotification:
    id: uuid.UUID
    user_id: str
    channel: str
    recipient: str
    context: dict[str, Any]
    locale: str | None


async def peek(executor: Executor, tenant_id: str, reminder_id: uuid.UUID) -> asyncpg.Record | None:
    return await executor.fetchrow(PEEK, tenant_id, reminder_id)


async def fire(
    executor: Executor,
    reminder: asyncpg.Record,
    *,
    due: datetime,
    late_after: float,
    template_key: str,
    category: str,
    notifications: list[ReminderNotification],
    audit_id: uuid.UUID,
) -> asyncpg.Record | None:
    """Fire (or skip) `reminder` with its notifications; None when the entry was stale or
    the reminder changed since it was read (no longer scheduled, moved, re-timed)."""
    return await executor.fetchrow(
        FIRE,
        reminder["tenant_id"],
        reminder["id"],
        due,
        reminder["interview_time"],
        late_after,
        [n.id for n in notifications],
        template_key,
        category,
        [n.user_id for n in notifications],
        [n.channel for n in notifications],
        [n.recipient for n in notifications],
        [n.context for n in notifications],
        [n.locale for n in notifications],
        audit_id,
    )


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


async def scheduled_page(
    executor: Executor, after: tuple[datetime, uuid.UUID] | None, limit: int
) -> list[asyncpg.Record]:
    start_time, start_id = after or (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0))
    return await executor.fetch(SCHEDULED_PAGE, start_time, start_id, limit)


async def overdue(executor: Executor, older_than: float, limit: int) -> list[asyncpg.Record]:
    return await executor.fetch(OVERDUE, older_than, limit)


async def peek_many(executor: Executor, keys: list[tuple[str, uuid.UUID]]) -> list[asyncpg.Record]:
    return await executor.fetch(PEEK_MANY, [k[0] for k in keys], [k[1] for k in keys])


async def fire_many(
    executor: Executor,
    reminders: list[tuple[DueReminder, list[ReminderNotification]]],
    *,
    late_after: float,
    template_key: str,
    category: str,
    audit_ids: list[uuid.UUID],
) -> list[asyncpg.Record]:
    """Fire (or skip) many reminders with their notifications in one statement; returns the
    ones that fired or were skipped (a changed or stale one is simply absent)."""
    notifications = [(d.row["id"], n) for d, planned in reminders for n in planned]
    return await executor.fetch(
        FIRE_MANY,
        [d.row["tenant_id"] for d, _ in reminders],
        [d.row["id"] for d, _ in reminders],
        [d.due for d, _ in reminders],
        [d.row["interview_time"] for d, _ in reminders],
        audit_ids,
        [reminder_id for reminder_id, _ in notifications],
        [n.id for _, n in notifications],
        [n.user_id for _, n in notifications],
        [n.channel for _, n in notifications],
        [n.recipient for _, n in notifications],
        [n.context for _, n in notifications],
        [n.locale for _, n in notifications],
        late_after,
        template_key,
        category,
    )


# Retention: reminders fired, skipped or cancelled whose interview is older than the cutoff
# (so also created before it), oldest first. Never a scheduled one.
PURGE_EXPIRED = retention.purge_statement(
    "interview_reminders",
    "interview_time",
    only="status IN ('fired', 'skipped', 'cancelled')",
)


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` finished reminders whose interview is older than the cutoff."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)
