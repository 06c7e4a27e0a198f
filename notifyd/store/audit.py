"""The audit log: one row per write, inside the write's own transaction.

Writing it in the same transaction means an audited change and its audit row commit or roll
back together; there is no window where one exists without the other.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from notifyd.ids import uuid7
from notifyd.store import retention
from notifyd.store.pool import Conn, Executor


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class AuditEntry:
    tenant_id: str
    user_id: str | None
    action: str
    ip_address: str | None
    request_id: str | None
    details: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Author:
    """Who makes a write outside a request (the CLI, ingestion): the audit row's user (and a
    sent notification's `created_by`), and what the audit row says of the source
    (`{"via": "cli", ...}`, `{"via": "ingest", "event_id": ...}`)."""

    user_id: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def entry(self, tenant_id: str, action: str, details: Mapping[str, Any]) -> AuditEntry:
        return AuditEntry(tenant_id, self.user_id, action, None, None, {**self.details, **details})


INSERT = """
INSERT INTO audit_log (id, tenant_id, user_id, action, ip_address, request_id, details)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

LIST = """
SELECT id, user_id, action, ip_address, request_id, details, created_at
FROM audit_log
WHERE tenant_id = $1
  AND ($2::uuid IS NULL OR id < $2)
  AND ($3::text IS NULL OR action = $3)
  AND ($4::text IS NULL OR user_id = $4)
ORDER BY id DESC
LIMIT $5
"""


async def record(conn: Conn, entry: AuditEntry) -> None:
    await conn.execute(
        INSERT,
        uuid7(),
        entry.tenant_id,
        entry.user_id,
        entry.action,
        entry.ip_address,
        entry.request_id,
        entry.details,
    )


def as_columns(entries: Sequence[AuditEntry]) -> list[list[Any]]:
    """Audit rows as the seven arrays `INSERT INTO audit_log … SELECT * FROM unnest(…)`
    takes (id, tenant, user, action, ip, request id, details): many rows in one statement."""
    return [
        [uuid7() for _ in entries],
        [e.tenant_id for e in entries],
        [e.user_id for e in entries],
        [e.action for e in entries],
        [e.ip_address for e in entries],
        [e.request_id for e in entries],
        [e.details for e in entries],
    ]


async def list_entries(
    conn: Executor,
    tenant_id: str,
    *,
    before: uuid.UUID | None,
    action: str | None,
    user_id: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await conn.fetch(LIST, tenant_id, before, action, user_id, limit)


# Retention: audit rows written before the cutoff, oldest first.
PURGE_EXPIRED = retention.purge_statement("audit_log", "created_at")


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` audit rows older than the cutoff, after `after`."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)
