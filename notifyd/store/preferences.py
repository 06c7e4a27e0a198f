"""Per-user channel and category opt-outs, one row per (tenant, user).

The dispatcher reads them once per notification; a user with no row has opted out of nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from notifyd.preferences import Preferences
from notifyd.store.pool import Conn, Executor

GET = "SELECT channels, categories FROM preferences WHERE tenant_id = $1 AND user_id = $2"

UPSERT = """
INSERT INTO preferences (tenant_id, user_id, channels, categories)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, user_id)
DO UPDATE SET channels = EXCLUDED.channels, categories = EXCLUDED.categories, updated_at = now()
"""


def _flags(value: Any) -> dict[str, bool]:
    if not isinstance(value, Mapping):
        return {}
    return {str(name): flag for name, flag in value.items() if isinstance(flag, bool)}


GET_MANY = """
SELECT p.tenant_id, p.user_id, p.channels, p.categories
FROM unnest($1::text[], $2::text[]) AS k (tenant_id, user_id)
JOIN preferences p ON p.tenant_id = k.tenant_id AND p.user_id = k.user_id
"""


async def load_many(
    executor: Executor, users: Collection[tuple[str, str]]
) -> dict[tuple[str, str], Preferences]:
    """The saved preferences of many (tenant, user) at once; users without any are absent."""
    if not users:
        return {}
    rows = await executor.fetch(GET_MANY, [t for t, _ in users], [u for _, u in users])
    return {
        (r["tenant_id"], r["user_id"]): Preferences(
            channels=_flags(r["channels"]), categories=_flags(r["categories"])
        )
        for r in rows
    }


async def load(executor: Executor, tenant_id: str, user_id: str) -> Preferences | None:
    """The user's preferences, or None when they never saved any."""
    row = await executor.fetchrow(GET, tenant_id, user_id)
    if row is None:
        return None
    return Preferences(channels=_flags(row["channels"]), categories=_flags(row["categories"]))


async def save(conn: Conn, tenant_id: str, user_id: str, prefs: Preferences) -> None:
    """Replace the user's preferences (an upsert)."""
    await conn.execute(UPSERT, tenant_id, user_id, dict(prefs.channels), dict(prefs.categories))
