"""Recipients: a user's addresses, time zone, locale and name, one row per (tenant, user).

Workflow steps read them when they fire (the address of the step's channel, the locale to
render in); a user with no row has no email or phone, so only in-app steps reach them.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncpg

from notifyd.store.pool import Conn, Executor

FIELDS = ("email", "phone", "timezone", "locale", "name")
"""The stored values; each may be NULL (absent)."""

COLUMNS = "tenant_id, user_id, email, phone, timezone, locale, name, created_at, updated_at"

GET = f"SELECT {COLUMNS} FROM recipients WHERE tenant_id = $1 AND user_id = $2"

# PUT replaces the whole recipient: a value left out of the body is cleared
PUT = f"""
INSERT INTO recipients (tenant_id, user_id, email, phone, timezone, locale, name)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (tenant_id, user_id) DO UPDATE
SET email = EXCLUDED.email, phone = EXCLUDED.phone, timezone = EXCLUDED.timezone,
    locale = EXCLUDED.locale, name = EXCLUDED.name, updated_at = now()
RETURNING {COLUMNS}
"""

# PATCH by the user: only time zone and locale, each kept unless given ($5, $6 say which)
PATCH_OWN = f"""
INSERT INTO recipients (tenant_id, user_id, timezone, locale)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, user_id) DO UPDATE
SET timezone = CASE WHEN $5 THEN EXCLUDED.timezone ELSE recipients.timezone END,
    locale = CASE WHEN $6 THEN EXCLUDED.locale ELSE recipients.locale END,
    updated_at = now()
RETURNING {COLUMNS}
"""

DELETE = "DELETE FROM recipients WHERE tenant_id = $1 AND user_id = $2 RETURNING user_id"


async def get(executor: Executor, tenant_id: str, user_id: str) -> asyncpg.Record | None:
    return await executor.fetchrow(GET, tenant_id, user_id)


async def put(
    conn: Conn, tenant_id: str, user_id: str, values: Mapping[str, str | None]
) -> asyncpg.Record:
    row = await conn.fetchrow(PUT, tenant_id, user_id, *(values.get(f) for f in FIELDS))
    assert row is not None
    return row


async def patch_own(
    conn: Conn, tenant_id: str, user_id: str, values: Mapping[str, str | None]
) -> asyncpg.Record:
    """Only `timezone` and `locale`; a key absent from `values` keeps its stored value."""
    row = await conn.fetchrow(
        PATCH_OWN,
        tenant_id,
        user_id,
        values.get("timezone"),
        values.get("locale"),
        "timezone" in values,
        "locale" in values,
    )
    assert row is not None
    return row


async def delete(conn: Conn, tenant_id: str, user_id: str) -> bool:
    return await conn.fetchval(DELETE, tenant_id, user_id) is not None
