"""Delivery state of a notification row: claim, outcome, retries, provider callbacks.

Every transition is a guarded UPDATE whose WHERE clause names the state it leaves, so two
instances (or a replayed stream entry) racing on one row cannot both win: the loser's UPDATE
matches nothing and it moves on.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from notifyd.store.pool import Conn, Executor

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
          attempts, created_at, critical
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


def _changed(status: str) -> bool:
    return status.rsplit(" ", 1)[1] != "0"


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


# --- many at once: the dispatcher and the in-app sender handle a whole stream read per call --
#
# Their state guards are written `(n.status = …) IS TRUE`. A plain `n.status = 'queued'`
# lets the planner answer the batch from the partial in-flight index, which it prices by
# statistics taken when few rows were in flight; with a backlog (an outage, a burst) that
# index holds every waiting row, and each batch of 64 would walk all of them, slower the
# longer the backlog (docs/benchmarks.md), so the dispatcher slowed down exactly when it
# had the most to catch up on. `IS TRUE` means the same for a NOT NULL column, but the planner
# cannot match it to the index predicate, so a batch always costs its primary-key probes.

# The rows with their recipients' saved preferences (NULL columns: none saved) and their
# address's suppression-list entry (NULL: none), one query. The entry is one probe of the
# list's unique index per row; an entry for every category ('') sorts before one for the
# row's category, so the stronger reason is the one seen (see `notifyd.suppressions`).
LOAD_MANY_FOR_DISPATCH = """
SELECT n.id, n.tenant_id, n.channel, n.recipient, n.user_id, n.subject, n.body, n.html_body,
       n.template_key, n.context, n.locale, n.category, n.critical, n.status, n.attempts,
       n.created_at, p.channels AS preferred_channels, p.categories AS preferred_categories
FROM unnest($1::text[], $2::uuid[]) AS k (tenant_id, id)
JOIN notifications n ON n.id = k.id AND (n.tenant_id = k.tenant_id) IS TRUE
LEFT JOIN preferences p ON p.tenant_id = n.tenant_id AND p.user_id = n.user_id
"""

# The suppression list's entry for each row's address (its own category's, else the one for
# every category), asked only for the email and SMS rows of a batch. A statement of its own:
# joined into the load above, it doubled the load's planning time (when the queue pool
# planned every execution, before the keyed pool, store.pool) for in-app batches that never
# need it, and it still costs them nothing.
LISTED_MANY = """
SELECT DISTINCT ON (n.id) n.id, s.reason, s.category
FROM unnest($1::text[], $2::uuid[]) AS k (tenant_id, id)
JOIN notifications n ON n.id = k.id AND (n.tenant_id = k.tenant_id) IS TRUE
JOIN suppressions s ON s.tenant_id = n.tenant_id AND s.channel = n.channel
                   AND s.address = CASE n.channel WHEN 'email' THEN lower(btrim(n.recipient))
                                                  ELSE btrim(n.recipient) END
                   AND s.category IN ('', COALESCE(n.category, ''))
ORDER BY n.id, s.category
"""
LISTED_CHANNELS = frozenset({"email", "sms"})  # the channels a suppression list holds

DISPATCH_MANY = """
UPDATE notifications n
SET status = 'dispatched', subject = k.subject, body = k.body, html_body = k.html_body,
    updated_at = now()
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[])
     AS k (tenant_id, id, subject, body, html_body)
WHERE n.id = k.id AND (n.tenant_id = k.tenant_id) IS TRUE AND (n.status = 'queued') IS TRUE
RETURNING n.id
"""

# queued rows the dispatcher will not send (the suppression list, the recipient's opt-outs)
SUPPRESS_MANY = """
UPDATE notifications n
SET status = 'suppressed', last_error = k.reason, updated_at = now()
FROM unnest($1::text[], $2::uuid[], $3::text[]) AS k (tenant_id, id, reason)
WHERE n.tenant_id = k.tenant_id AND n.id = k.id AND (n.status = 'queued') IS TRUE
RETURNING n.id
"""

CLAIM_MANY = """
UPDATE notifications n
SET status = 'sending', attempts = n.attempts + 1, claimed_at = now(), updated_at = now()
FROM unnest($1::text[], $2::uuid[]) AS k (tenant_id, id)
WHERE n.tenant_id = k.tenant_id AND n.id = k.id
  AND (n.status = 'dispatched'
       OR (n.status = 'retrying' AND n.next_attempt_at <= now() + interval '2 seconds')
       OR (n.status = 'sending' AND n.claimed_at < now() - make_interval(secs => $3))) IS TRUE
RETURNING n.id, n.tenant_id, n.channel, n.recipient, n.user_id, n.subject, n.body, n.html_body,
          n.category, n.attempts, n.created_at, n.critical
"""

# Park: not sent now, and no attempt used (its relay's circuit is open, or its tenant is at
# its cap). The row waits as a retry does, `retrying` until `next_attempt_at`, so the wheel
# entry the sender adds is the one the sweeper rebuilds from the row (`retry_item` with the
# same attempts), and a Redis that lost it gets it back. Taken only from a state a claim
# could take: a peer that claimed or parked the row first wins, this matches nothing.
# `last_error` NULL keeps the one there (a tenant at its cap is not an error). Many rows at
# once: the sender group-commits its parks. Returns the ids parked with their attempts.
PARK_MANY = """
UPDATE notifications n
SET status = 'retrying', next_attempt_at = k.until, last_error = COALESCE(k.reason, n.last_error),
    updated_at = now()
FROM unnest($1::text[], $2::uuid[], $3::timestamptz[], $4::text[])
     AS k (tenant_id, id, until, reason)
WHERE n.tenant_id = k.tenant_id AND n.id = k.id
  AND (n.status = 'dispatched'
       OR (n.status = 'retrying' AND n.next_attempt_at <= now() + interval '2 seconds')) IS TRUE
RETURNING n.id, n.attempts
"""

STATES = """
SELECT n.id, n.status FROM unnest($1::text[], $2::uuid[]) AS k (tenant_id, id)
JOIN notifications n ON n.tenant_id = k.tenant_id AND n.id = k.id
"""

# in-app sends have no provider status: the row simply becomes sent
MARK_MANY_SENT = """
UPDATE notifications n
SET status = 'sent', sent_at = now(), last_error = NULL, next_attempt_at = NULL,
    provider_message_id = COALESCE(k.provider_message_id, n.provider_message_id),
    provider_status = COALESCE(n.provider_status, 'sent'), updated_at = now()
FROM unnest($1::text[], $2::uuid[], $3::int[], $4::text[])
     AS k (tenant_id, id, attempts, provider_message_id)
WHERE n.tenant_id = k.tenant_id AND n.id = k.id AND (n.status = 'sending') IS TRUE
  AND n.attempts = k.attempts
RETURNING n.id
"""

# In-app rows delivered where they are dispatched (`actors.dispatcher.DirectInApp`): from `queued`
# straight to `sent`, with the live event's offset. One row version instead of the three that
# dispatched → sending → sent would write.
SEND_QUEUED_MANY = """
UPDATE notifications n
SET status = 'sent', attempts = n.attempts + 1, sent_at = now(), last_error = NULL,
    next_attempt_at = NULL, subject = k.subject, body = k.body, html_body = k.html_body,
    provider_message_id = k.feed_offset, provider_status = 'sent', updated_at = now()
FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[])
     AS k (tenant_id, id, subject, body, html_body, feed_offset)
WHERE n.id = k.id AND (n.tenant_id = k.tenant_id) IS TRUE AND (n.status = 'queued') IS TRUE
RETURNING n.id
"""

Key = tuple[str, uuid.UUID]  # (tenant_id, notification id)


def _columns(keys: Sequence[Key]) -> tuple[list[str], list[uuid.UUID]]:
    return [tenant for tenant, _ in keys], [nid for _, nid in keys]


async def load_many_for_dispatch(executor: Executor, keys: Sequence[Key]) -> list[asyncpg.Record]:
    """The rows with their users' preferences (`preferred_channels`, `preferred_categories`)."""
    return await executor.fetch(LOAD_MANY_FOR_DISPATCH, *_columns(keys))


async def listed_many(
    executor: Executor, rows: Sequence[asyncpg.Record]
) -> dict[uuid.UUID, tuple[str, str]]:
    """id → (reason, category) of the suppression list entry for each email or SMS row's
    address (`category` '' when it holds for every category); no query for a batch without
    such rows."""
    keys = [(r["tenant_id"], r["id"]) for r in rows if r["channel"] in LISTED_CHANNELS]
    if not keys:
        return {}
    found = await executor.fetch(LISTED_MANY, *_columns(keys))
    return {r["id"]: (r["reason"], r["category"]) for r in found}


async def dispatch_many(
    executor: Executor,
    rows: Sequence[tuple[str, uuid.UUID, str | None, str, str | None]],
) -> set[uuid.UUID]:
    """(tenant, id, subject, body, html) of queued rows → dispatched; the ids that changed."""
    changed = await executor.fetch(
        DISPATCH_MANY,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3] for r in rows],
        [r[4] for r in rows],
    )
    return {r["id"] for r in changed}


async def suppress_many(
    executor: Executor, rows: Sequence[tuple[str, uuid.UUID, str]]
) -> set[uuid.UUID]:
    """(tenant, id, reason) of queued rows → suppressed with that reason; the ids changed."""
    changed = await executor.fetch(
        SUPPRESS_MANY, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    )
    return {r["id"] for r in changed}


async def claim_many(executor: Executor, keys: Sequence[Key], lease: float) -> list[asyncpg.Record]:
    return await executor.fetch(CLAIM_MANY, *_columns(keys), lease)


async def park_many(
    executor: Executor, parks: Sequence[tuple[str, uuid.UUID, datetime, str | None]]
) -> dict[uuid.UUID, int]:
    """(tenant, id, until, reason) → the rows parked, id → attempts (see PARK_MANY)."""
    rows = await executor.fetch(
        PARK_MANY,
        [p[0] for p in parks],
        [p[1] for p in parks],
        [p[2] for p in parks],
        [p[3] for p in parks],
    )
    return {r["id"]: r["attempts"] for r in rows}


async def states(executor: Executor, keys: Sequence[Key]) -> dict[uuid.UUID, str]:
    rows = await executor.fetch(STATES, *_columns(keys))
    return {r["id"]: r["status"] for r in rows}


async def mark_many_sent(
    executor: Executor, claimed: Sequence[tuple[str, uuid.UUID, int, str | None]]
) -> set[uuid.UUID]:
    """(tenant, id, attempt, provider message id) of claimed rows → sent; the ids recorded
    (a peer that took a claim over may have recorded one first)."""
    rows = await executor.fetch(
        MARK_MANY_SENT,
        [c[0] for c in claimed],
        [c[1] for c in claimed],
        [c[2] for c in claimed],
        [c[3] for c in claimed],
    )
    return {r["id"] for r in rows}


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Published:
    """An in-app row whose live event is out: its content and the event's feed offset."""

    tenant_id: str
    id: uuid.UUID
    subject: str | None
    body: str
    html_body: str | None
    feed_offset: str


async def send_queued_many(executor: Executor, published: Sequence[Published]) -> set[uuid.UUID]:
    """Queued in-app rows whose event is published → sent, with their content; the ids
    recorded (a peer racing on the same intent may have recorded one first)."""
    rows = await executor.fetch(
        SEND_QUEUED_MANY,
        [p.tenant_id for p in published],
        [p.id for p in published],
        [p.subject for p in published],
        [p.body for p in published],
        [p.html_body for p in published],
        [p.feed_offset for p in published],
    )
    return {r["id"] for r in rows}
