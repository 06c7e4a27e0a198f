"""Webhook endpoints and their deliveries (notifyd/sql/0013_webhooks.sql).

Delivery rows are written by the triggers, in the transaction of the change they report; this
module reads them for the API and moves them for the sender:

- `claim`: due rows (`pending`, or `sending` past the lease of a sender that died), tenant by
  tenant, each tenant at most its free slots, `FOR UPDATE SKIP LOCKED` (two instances never
  take one row) → `sending`, attempts + 1, `next_attempt_at` = the lease's end;
- `record`: the attempt's outcome, only while the claim still holds (`status = 'sending' AND
  attempts = n`): `succeeded`, `pending` again with the next attempt's time, or `failed` once
  the retry window is over; the attempt is appended to the row's log either way;
- `replay`: `pending` now, a new retry window, the same id.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from notifyd.store import retention
from notifyd.store.pool import Conn, Executor

NOTIFY_CHANNEL = "notifyd_webhooks"
"""What the triggers NOTIFY at the commit of rows for the sender (0013_webhooks.sql)."""
WAKE = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

ENDPOINT_COLUMNS = (
    "id, tenant_id, url, description, events, enabled, disabled_reason, created_at, updated_at"
)
DELIVERY_COLUMNS = (
    "id, endpoint_id, event_type, occurred_at, data, status, attempts, next_attempt_at, "
    "done_at, last_status_code, last_error, last_latency_ms, attempt_log"
)

# one tenant's creates in turn, so two at once cannot pass the cap together
LOCK_TENANT = "SELECT pg_advisory_xact_lock(hashtextextended('notifyd:webhooks:' || $1, 0))"
COUNT = "SELECT count(*) FROM webhook_endpoints WHERE tenant_id = $1"
CREATE = f"""
INSERT INTO webhook_endpoints (id, tenant_id, url, description, events, secret_enc)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING {ENDPOINT_COLUMNS}
"""
LIST = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY id"
GET = f"SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2"
# each value kept unless given ($7.. say which); turning it back on restarts its clock
PATCH = f"""
UPDATE webhook_endpoints
SET url = CASE WHEN $7 THEN $3 ELSE url END,
    events = CASE WHEN $8 THEN $4 ELSE events END,
    description = CASE WHEN $9 THEN $5 ELSE description END,
    enabled = CASE WHEN $10 THEN $6 ELSE enabled END,
    disabled_reason = CASE WHEN $10 AND $6 THEN NULL ELSE disabled_reason END,
    enabled_at = CASE WHEN $10 AND $6 AND NOT enabled THEN now() ELSE enabled_at END,
    updated_at = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {ENDPOINT_COLUMNS}
"""
DELETE = "DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2 RETURNING id"
ROTATE = f"""
UPDATE webhook_endpoints
SET previous_secret_enc = secret_enc,
    previous_until = now() + make_interval(secs => $4),
    secret_enc = $3,
    updated_at = now()
WHERE tenant_id = $1 AND id = $2
RETURNING {ENDPOINT_COLUMNS}
"""

DELIVERIES = f"""
SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
WHERE endpoint_id = $2 AND tenant_id = $1 AND ($3::uuid IS NULL OR id < $3)
ORDER BY id DESC LIMIT $4
"""
REPLAY = f"""
UPDATE webhook_deliveries
SET status = 'pending', next_attempt_at = now(), window_start = now(), done_at = NULL
WHERE tenant_id = $1 AND endpoint_id = $2 AND id = $3
RETURNING {DELIVERY_COLUMNS}
"""

# The sender's claim. Tenants with an enabled endpoint, in random order, each given its free
# slots ($3 minus its requests in flight here: $1/$2); per tenant its due rows oldest first
# through the (tenant_id, next_attempt_at) index, so a tenant's backlog is never in another's
# way; at most $4 rows in all. A row `sending` past its lease is a dead sender's: due again.
CLAIM = """
WITH tenants AS (
    SELECT t.tenant_id, GREATEST($3 - COALESCE(busy.n, 0), 0) AS slots
    FROM (SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE enabled) t
    LEFT JOIN unnest($1::text[], $2::int[]) AS busy (tenant_id, n) USING (tenant_id)
    ORDER BY random()
), picked AS (
    SELECT due.id
    FROM tenants, LATERAL (
        SELECT d.id FROM webhook_deliveries d
        WHERE d.tenant_id = tenants.tenant_id
          AND d.status IN ('pending', 'sending')
          AND d.next_attempt_at <= now()
          -- a turned-off endpoint's rows (a few, still in flight when it was) never take
          -- the slots of the tenant's other endpoints
          AND EXISTS (SELECT 1 FROM webhook_endpoints e
                      WHERE e.id = d.endpoint_id AND e.enabled)
        ORDER BY d.next_attempt_at
        LIMIT tenants.slots
        FOR UPDATE SKIP LOCKED
    ) due
    WHERE tenants.slots > 0
    LIMIT $4
)
UPDATE webhook_deliveries d
SET status = 'sending', attempts = d.attempts + 1,
    next_attempt_at = now() + make_interval(secs => $5)
FROM picked, webhook_endpoints e
WHERE d.id = picked.id AND e.id = d.endpoint_id AND e.enabled
RETURNING d.id, d.tenant_id, d.endpoint_id, d.event_type, d.occurred_at, d.data, d.attempts,
          d.window_start,
          EXTRACT(EPOCH FROM d.window_start + make_interval(secs => $6) - now())::float8
              AS window_left,
          e.url, e.secret_enc,
          CASE WHEN e.previous_until > now() THEN e.previous_secret_enc END AS previous_secret_enc
"""
# a stopping sender's claims, handed back: due now, for whichever instance claims them
RELEASE = """
UPDATE webhook_deliveries d SET status = 'pending', next_attempt_at = now()
FROM unnest($1::uuid[], $2::int[]) AS claim (id, attempts)
WHERE d.id = claim.id AND d.status = 'sending' AND d.attempts = claim.attempts
"""
# seconds until the next row falls due that is not due already (those wait for a free slot)
NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM min(next_attempt_at) - now())::float8
FROM webhook_deliveries
WHERE status IN ('pending', 'sending') AND next_attempt_at > now()
"""

# $3: succeeded | pending | failed; $4: seconds to the next attempt (pending). A success
# also notes the endpoint's `answered_at`, at most once a second (concurrent successes do not
# queue on the endpoint's row), in the same statement.
RECORD = """
WITH recorded AS (
UPDATE webhook_deliveries
SET status = $3,
    next_attempt_at = CASE WHEN $3 = 'pending' THEN now() + make_interval(secs => $4)
                           ELSE next_attempt_at END,
    done_at = CASE WHEN $3 = 'pending' THEN NULL ELSE now() END,
    last_status_code = $5, last_error = $6, last_latency_ms = $7,
    attempt_log = (CASE WHEN jsonb_array_length(attempt_log) >= $9
                        THEN attempt_log - 0 ELSE attempt_log END) || $8::jsonb
WHERE id = $1 AND status = 'sending' AND attempts = $2
RETURNING endpoint_id
), answered AS (
UPDATE webhook_endpoints e SET answered_at = now()
FROM recorded
WHERE $3 = 'succeeded' AND e.id = recorded.endpoint_id
  AND (e.answered_at IS NULL OR e.answered_at < now() - interval '1 second')
)
SELECT endpoint_id FROM recorded
"""
# A failed attempt disables its endpoint when nothing answered 2xx there since it was
# enabled and for NOTIFYD_WEBHOOK_RETRY_FOR ($2) seconds, or, when this attempt was the
# delivery's last ($4), since the delivery's window began ($5). One statement: one instance
# disables it.
ENDPOINT_FAILED = """
UPDATE webhook_endpoints
SET enabled = false, disabled_reason = $3, updated_at = now()
WHERE id = $1 AND enabled
  AND GREATEST(answered_at, enabled_at)
      <= CASE WHEN $4 THEN $5 ELSE now() - make_interval(secs => $2) END
RETURNING tenant_id, url
"""
# a disabled endpoint's rows still waiting end `failed` (a replay sends one again)
FAIL_WAITING = """
UPDATE webhook_deliveries
SET status = 'failed', done_at = now(), last_error = $2
WHERE endpoint_id = $1 AND status = 'pending'
"""

# finished deliveries past NOTIFYD_RETAIN_WEBHOOK_DELIVERIES, by their ids (UUIDv7)
PURGE_EXPIRED = retention.purge_statement(
    "webhook_deliveries", "done_at", "status IN ('succeeded', 'failed')"
)


class TooManyEndpoints(Exception):
    pass


async def create(
    conn: Conn,
    tenant_id: str,
    endpoint_id: uuid.UUID,
    *,
    url: str,
    events: Sequence[str],
    description: str,
    secret_enc: str,
    cap: int,
) -> asyncpg.Record:
    """A new endpoint, unless the tenant has `cap` already (`TooManyEndpoints`). In the
    caller's transaction."""
    await conn.execute(LOCK_TENANT, tenant_id)
    if await conn.fetchval(COUNT, tenant_id) >= cap:
        raise TooManyEndpoints
    row = await conn.fetchrow(
        CREATE, endpoint_id, tenant_id, url, description, list(events), secret_enc
    )
    assert row is not None
    return row


async def list_endpoints(executor: Executor, tenant_id: str) -> list[asyncpg.Record]:
    return list(await executor.fetch(LIST, tenant_id))


async def get(executor: Executor, tenant_id: str, endpoint_id: uuid.UUID) -> asyncpg.Record | None:
    return await executor.fetchrow(GET, tenant_id, endpoint_id)


async def patch(
    conn: Conn, tenant_id: str, endpoint_id: uuid.UUID, values: Mapping[str, Any]
) -> asyncpg.Record | None:
    """Change the fields in `values` (url, events, description, enabled)."""
    return await conn.fetchrow(
        PATCH,
        tenant_id,
        endpoint_id,
        values.get("url"),
        list(values["events"]) if "events" in values else None,
        values.get("description"),
        values.get("enabled"),
        "url" in values,
        "events" in values,
        "description" in values,
        "enabled" in values,
    )


async def fail_waiting(conn: Conn, endpoint_id: uuid.UUID, reason: str) -> None:
    """An endpoint turned off: its waiting deliveries fail (a replay sends one again)."""
    await conn.execute(FAIL_WAITING, endpoint_id, reason)


async def delete(conn: Conn, tenant_id: str, endpoint_id: uuid.UUID) -> bool:
    return await conn.fetchval(DELETE, tenant_id, endpoint_id) is not None


async def rotate(
    conn: Conn, tenant_id: str, endpoint_id: uuid.UUID, secret_enc: str, overlap: float
) -> asyncpg.Record | None:
    """The new sealed secret; the old one keeps signing for `overlap` seconds."""
    return await conn.fetchrow(ROTATE, tenant_id, endpoint_id, secret_enc, overlap)


async def deliveries(
    executor: Executor,
    tenant_id: str,
    endpoint_id: uuid.UUID,
    before: uuid.UUID | None,
    limit: int,
) -> list[asyncpg.Record]:
    return list(await executor.fetch(DELIVERIES, tenant_id, endpoint_id, before, limit))


async def replay(
    conn: Conn, tenant_id: str, endpoint_id: uuid.UUID, delivery_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(REPLAY, tenant_id, endpoint_id, delivery_id)


async def wake_senders(conn: Conn) -> None:
    """Have the senders look for due rows once the caller's transaction commits."""
    await conn.execute(WAKE)


async def claim(
    executor: Executor,
    busy: Mapping[str, int],
    *,
    tenant_cap: int,
    limit: int,
    lease: float,
    retry_for: float,
) -> list[asyncpg.Record]:
    tenants = list(busy)
    return list(
        await executor.fetch(
            CLAIM, tenants, [busy[t] for t in tenants], tenant_cap, limit, lease, retry_for
        )
    )


async def release(executor: Executor, claims: Sequence[tuple[uuid.UUID, int]]) -> None:
    """Hand back claims (delivery id, attempts) whose requests were cut off by a stop."""
    await executor.execute(RELEASE, [c[0] for c in claims], [c[1] for c in claims])


async def next_due(executor: Executor) -> float | None:
    """Seconds until the next delivery falls due (None: none waits)."""
    value = await executor.fetchval(NEXT_DUE)
    return None if value is None else float(value)


async def record(
    executor: Executor,
    delivery_id: uuid.UUID,
    attempts: int,
    *,
    status: str,
    retry_in: float,
    status_code: int | None,
    error: str | None,
    latency_ms: int,
    at: datetime,
    kept: int,
) -> uuid.UUID | None:
    """The attempt's outcome; None when the claim no longer holds (a replay, a takeover)."""
    entry = {
        "attempt": attempts,
        "at": at.isoformat(),
        "status_code": status_code,
        "latency_ms": latency_ms,
        "error": error,
    }
    endpoint_id: uuid.UUID | None = await executor.fetchval(
        RECORD,
        delivery_id,
        attempts,
        status,
        retry_in,
        status_code,
        error,
        latency_ms,
        [entry],
        kept,
    )
    return endpoint_id


async def endpoint_failed(
    conn: Conn,
    endpoint_id: uuid.UUID,
    *,
    disable_after: float,
    reason: str,
    last: bool,
    window_start: datetime,
) -> asyncpg.Record | None:
    """After a failed attempt: the endpoint (tenant_id, url) if this failure disabled it (see
    `ENDPOINT_FAILED`), its waiting rows failed in the same transaction; else None."""
    async with conn.transaction():
        row = await conn.fetchrow(
            ENDPOINT_FAILED, endpoint_id, disable_after, reason, last, window_start
        )
        if row is not None:
            await conn.execute(FAIL_WAITING, endpoint_id, reason)
        return row


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` finished deliveries done before the cutoff, after `after`."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)


async def trim_event_capture(conn: Conn, lock_timeout: float) -> int:
    """Turns off the capture triggers no consumer wants any more (0018_event_capture_on_demand:
    an endpoint's change only ever turns capture on); the number switched off. Each switch
    waits for the writes in flight on its table and holds new ones meanwhile, so it gives up
    past `lock_timeout` seconds (`asyncpg.LockNotAvailableError`) and is tried again next time."""
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = {max(1, round(lock_timeout * 1000))}")
        return int(await conn.fetchval("SELECT event_capture_sync(true)"))
