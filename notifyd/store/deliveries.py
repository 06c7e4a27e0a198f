"""Delivery state of a notification row: claim, outcome, retries, provider callbacks.

Every transition is a guarded UPDATE whose WHERE clause names the state it leaves, so two
instances (or a replayed stream entry) racing on one row cannot both win: the loser's UPDATE
matches nothing and it moves on.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from notifyd.store.pool import Conn, Executor

# What the dispatcher needs to route a row.
LOAD_FOR_DISPATCH = """
SELECT id, tenant_id, channel, recipient, user_id, subject, body, html_body, template_key,
       context, locale, category, critical, status, attempts
FROM notifications WHERE tenant_id = $1 AND id = $2
"""

DISPATCH = """
UPDATE notifications
SET status = 'dispatched', subject = $3, body = $4, html_body = $5, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'queued'
"""

SUPPRESS = """
UPDATE notifications SET status = 'suppressed', last_error = $3, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'queued'
"""

FAIL_QUEUED = """
UPDATE notifications SET status = 'failed', last_error = $3, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'queued'
"""

# Claim for sending: from dispatched, from a due retry, or from a `sending` whose claimant went
# quiet for longer than the lease (it crashed mid-send: at-least-once, the provider may see it
# twice).
CLAIM = """
UPDATE notifications
SET status = 'sending', attempts = attempts + 1, claimed_at = now(), updated_at = now()
WHERE tenant_id = $1 AND id = $2
  AND (status = 'dispatched'
       -- a retry only once due (a little early is the timer's clock, not a bypass)
       OR (status = 'retrying' AND next_attempt_at <= now() + interval '2 seconds')
       OR (status = 'sending' AND claimed_at < now() - make_interval(secs => $3)))
RETURNING id, tenant_id, channel, recipient, user_id, subject, body, html_body, category,
          attempts, created_at
"""

STATE = """
SELECT status, claimed_at, next_attempt_at FROM notifications WHERE tenant_id = $1 AND id = $2
"""

# A provider callback may have landed before this (it is keyed by our id): keep its stage.
MARK_SENT = """
UPDATE notifications
SET status = CASE COALESCE(provider_status, $5)
                 WHEN 'delivered' THEN 'delivered'
                 WHEN 'undelivered' THEN 'undelivered'
                 WHEN 'failed' THEN 'undelivered'
                 ELSE 'sent' END,
    sent_at = now(), provider_message_id = COALESCE($4, provider_message_id),
    provider_status = COALESCE(provider_status, $5), last_error = NULL, next_attempt_at = NULL,
    updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3
"""

MARK_RETRYING = """
UPDATE notifications
SET status = 'retrying', last_error = $4, next_attempt_at = $5, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3
"""

MARK_FAILED = """
UPDATE notifications
SET status = 'failed', last_error = $4, next_attempt_at = NULL, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status = 'sending' AND attempts = $3
"""

# An admin's requeue: a failed (or undelivered) delivery starts over with fresh attempts.
REQUEUE_FAILED = """
UPDATE notifications
SET status = 'dispatched', attempts = 0, last_error = NULL, next_attempt_at = NULL,
    provider_status = NULL, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND status IN ('failed', 'undelivered')
RETURNING channel
"""

# Provider callbacks may arrive out of order, and even before the send was recorded: only a
# later stage overwrites an earlier one, and the row's status follows only once it is sent.
_STAGE = """(CASE {0} WHEN 'delivered' THEN 3 WHEN 'undelivered' THEN 3 WHEN 'failed' THEN 3
             WHEN 'sent' THEN 2 WHEN 'sending' THEN 1 ELSE 0 END)"""
PROVIDER_STATUS = f"""
UPDATE notifications
SET provider_status = $3,
    provider_message_id = COALESCE(provider_message_id, $4),
    status = CASE WHEN status IN ('sent', 'delivered', 'undelivered') AND $5::text IS NOT NULL
                  THEN $5 ELSE status END,
    delivered_at = CASE WHEN $5 = 'delivered' THEN now() ELSE delivered_at END,
    last_error = COALESCE($6, last_error),
    updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND channel = $7
  AND (provider_message_id IS NULL OR $4::text IS NULL OR provider_message_id = $4)
  AND {_STAGE.format("provider_status")} < {_STAGE.format("$3::text")}
RETURNING tenant_id, id, status, user_id
"""

# Work whose stream entry may be gone (the process died, or Redis lost it): the sweeper puts
# it back. Bumping updated_at makes each row come back at most once per bound.
STUCK = """
UPDATE notifications SET updated_at = now()
WHERE id IN (
    SELECT id FROM notifications
    WHERE status IN ('queued', 'dispatched', 'sending', 'retrying')
      AND updated_at < now() - make_interval(secs => $1)
      AND (status <> 'retrying' OR next_attempt_at < now() - make_interval(secs => $1))
    ORDER BY updated_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
RETURNING tenant_id, id, channel, status
"""

RETRYING_DUE = """
SELECT tenant_id, id, channel, attempts, next_attempt_at FROM notifications
WHERE status = 'retrying' ORDER BY next_attempt_at LIMIT $1
"""


@dataclass(frozen=True, slots=True)
class Stuck:
    tenant_id: str
    id: uuid.UUID
    channel: str
    status: str


async def load_for_dispatch(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID
) -> asyncpg.Record | None:
    return await executor.fetchrow(LOAD_FOR_DISPATCH, tenant_id, notification_id)


def _changed(status: str) -> bool:
    return status.rsplit(" ", 1)[1] != "0"


async def dispatch(
    executor: Executor,
    tenant_id: str,
    notification_id: uuid.UUID,
    subject: str | None,
    body: str,
    html_body: str | None,
) -> bool:
    return _changed(
        await executor.execute(DISPATCH, tenant_id, notification_id, subject, body, html_body)
    )


async def suppress(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID, reason: str
) -> bool:
    return _changed(await executor.execute(SUPPRESS, tenant_id, notification_id, reason))


async def fail_queued(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID, reason: str
) -> bool:
    return _changed(await executor.execute(FAIL_QUEUED, tenant_id, notification_id, reason))


async def claim(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID, lease: float
) -> asyncpg.Record | None:
    return await executor.fetchrow(CLAIM, tenant_id, notification_id, lease)


async def state(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID
) -> asyncpg.Record | None:
    return await executor.fetchrow(STATE, tenant_id, notification_id)


async def mark_sent(
    executor: Executor,
    tenant_id: str,
    notification_id: uuid.UUID,
    attempt: int,
    provider_message_id: str | None,
    provider_status: str | None,
) -> bool:
    return _changed(
        await executor.execute(
            MARK_SENT, tenant_id, notification_id, attempt, provider_message_id, provider_status
        )
    )


async def mark_retrying(
    executor: Executor,
    tenant_id: str,
    notification_id: uuid.UUID,
    attempt: int,
    reason: str,
    next_attempt_at: datetime,
) -> bool:
    return _changed(
        await executor.execute(
            MARK_RETRYING, tenant_id, notification_id, attempt, reason, next_attempt_at
        )
    )


async def mark_failed(
    executor: Executor, tenant_id: str, notification_id: uuid.UUID, attempt: int, reason: str
) -> bool:
    return _changed(
        await executor.execute(MARK_FAILED, tenant_id, notification_id, attempt, reason)
    )


async def requeue_failed(conn: Conn, tenant_id: str, notification_id: uuid.UUID) -> str | None:
    """Start a failed delivery over; returns its channel, or None if it was not failed."""
    channel: str | None = await conn.fetchval(REQUEUE_FAILED, tenant_id, notification_id)
    return channel


async def record_provider_status(
    executor: Executor,
    tenant_id: str,
    notification_id: uuid.UUID,
    channel: str,
    *,
    provider_message_id: str | None,
    provider_status: str,
    new_status: str | None,
    error: str | None,
) -> asyncpg.Record | None:
    """Apply a provider callback; None when it was stale (a later stage already recorded)."""
    return await executor.fetchrow(
        PROVIDER_STATUS,
        tenant_id,
        notification_id,
        provider_status,
        provider_message_id,
        new_status,
        error,
        channel,
    )


async def take_stuck(executor: Executor, older_than: float, limit: int) -> list[Stuck]:
    rows = await executor.fetch(STUCK, older_than, limit)
    return [Stuck(r["tenant_id"], r["id"], r["channel"], r["status"]) for r in rows]


async def retrying_due(executor: Executor, limit: int) -> list[asyncpg.Record]:
    return await executor.fetch(RETRYING_DUE, limit)
