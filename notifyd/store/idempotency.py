"""Idempotency keys: the first response to a POST, kept for a day, scoped to tenant and caller.

The row is claimed (inserted without a response) before the handler runs, so a duplicate that
arrives while the first is in flight sees the claim and is told 409 instead of running twice.
A claim older than the stale bound is a crashed request and may be taken over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from notifyd.store.pool import Executor

CLAIM = """
INSERT INTO idempotency_keys (tenant_id, user_id, key, request_hash)
VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
"""

GET = """
SELECT request_hash, status_code, headers, body, completed_at,
       created_at < now() - make_interval(secs => $4) AS expired,
       completed_at IS NULL AND created_at < now() - make_interval(secs => $5) AS stale
FROM idempotency_keys WHERE tenant_id = $1 AND user_id = $2 AND key = $3
"""

# Take over an expired or abandoned claim: only one of several racing requests wins.
TAKE_OVER = """
UPDATE idempotency_keys
SET request_hash = $4, status_code = NULL, headers = NULL, body = NULL,
    created_at = now(), completed_at = NULL
WHERE tenant_id = $1 AND user_id = $2 AND key = $3
  AND (created_at < now() - make_interval(secs => $5)
       OR (completed_at IS NULL AND created_at < now() - make_interval(secs => $6)))
"""

COMPLETE = """
UPDATE idempotency_keys SET status_code = $4, headers = $5, body = $6, completed_at = now()
WHERE tenant_id = $1 AND user_id = $2 AND key = $3
"""

# Only an unfinished claim: a response recorded with its write (same transaction) stays.
RELEASE = """
DELETE FROM idempotency_keys
WHERE tenant_id = $1 AND user_id = $2 AND key = $3 AND completed_at IS NULL
"""

PURGE = """
DELETE FROM idempotency_keys
WHERE ctid IN (SELECT ctid FROM idempotency_keys
               WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)
"""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    request_hash: bytes
    status_code: int | None
    headers: dict[str, str] | None
    body: bytes | None

    @property
    def completed(self) -> bool:
        return self.status_code is not None


@dataclass(frozen=True, slots=True)
class Scope:
    tenant_id: str
    user_id: str
    key: str


async def claim(
    pool: asyncpg.Pool, scope: Scope, request_hash: bytes, ttl: float, stale_after: float
) -> StoredResponse | None:
    """None when this request owns the key now; else what the earlier request left."""
    async with pool.acquire() as conn:
        status = await conn.execute(CLAIM, scope.tenant_id, scope.user_id, scope.key, request_hash)
        if status.endswith(" 1"):
            return None
        row = await conn.fetchrow(GET, scope.tenant_id, scope.user_id, scope.key, ttl, stale_after)
        if row is None:  # released between our insert and read: try once more
            status = await conn.execute(
                CLAIM, scope.tenant_id, scope.user_id, scope.key, request_hash
            )
            if status.endswith(" 1"):
                return None
            row = await conn.fetchrow(
                GET, scope.tenant_id, scope.user_id, scope.key, ttl, stale_after
            )
            assert row is not None
        if row["expired"] or row["stale"]:
            taken = await conn.execute(
                TAKE_OVER,
                scope.tenant_id,
                scope.user_id,
                scope.key,
                request_hash,
                ttl,
                stale_after,
            )
            if taken.endswith(" 1"):
                return None
        return StoredResponse(
            request_hash=bytes(row["request_hash"]),
            status_code=row["status_code"],
            headers=row["headers"],
            body=None if row["body"] is None else bytes(row["body"]),
        )


async def complete(
    executor: Executor, scope: Scope, status_code: int, headers: dict[str, Any], body: bytes
) -> None:
    await executor.execute(
        COMPLETE, scope.tenant_id, scope.user_id, scope.key, status_code, headers, body
    )


async def release(pool: asyncpg.Pool, scope: Scope) -> None:
    """Forget a claim whose request failed, so a retry with the same key can run."""
    await pool.execute(RELEASE, scope.tenant_id, scope.user_id, scope.key)


async def purge_expired(pool: asyncpg.Pool, ttl: float, batch: int = 1000) -> int:
    status = await pool.execute(PURGE, ttl, batch)
    return int(status.rsplit(" ", 1)[1])
