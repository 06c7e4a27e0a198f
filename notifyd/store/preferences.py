"""Per-user channel and category opt-outs, one row per (tenant, user).

The dispatcher reads them with the notifications it dispatches (a join); a user with no row
has opted out of nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
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


# One-click unsubscribe: one opt-out merged into what the user saved (a row made if none),
# in one statement, so a PUT racing with it loses nothing it did not replace itself.
OPT_OUT_CATEGORY = """
INSERT INTO preferences (tenant_id, user_id, categories)
VALUES ($1, $2, jsonb_build_object($3::text, false))
ON CONFLICT (tenant_id, user_id)
DO UPDATE SET categories = preferences.categories || jsonb_build_object($3::text, false),
              updated_at = now()
"""
OPT_OUT_CHANNEL = """
INSERT INTO preferences (tenant_id, user_id, channels)
VALUES ($1, $2, jsonb_build_object($3::text, false))
ON CONFLICT (tenant_id, user_id)
DO UPDATE SET channels = preferences.channels || jsonb_build_object($3::text, false),
              updated_at = now()
"""


def _flags(value: Any) -> dict[str, bool]:
    if not isinstance(value, Mapping):
        return {}
    return {str(name): flag for name, flag in value.items() if isinstance(flag, bool)}


def from_columns(channels: Any, categories: Any) -> Preferences | None:
    """Preferences read as columns of another query (a LEFT JOIN: both NULL when the user
    saved none)."""
    if channels is None and categories is None:
        return None
    return Preferences(channels=_flags(channels), categories=_flags(categories))


async def load(executor: Executor, tenant_id: str, user_id: str) -> Preferences | None:
    """The user's preferences, or None when they never saved any."""
    row = await executor.fetchrow(GET, tenant_id, user_id)
    return None if row is None else from_columns(row["channels"], row["categories"])


async def save(conn: Conn, tenant_id: str, user_id: str, prefs: Preferences) -> None:
    """Replace the user's preferences (an upsert)."""
    await conn.execute(UPSERT, tenant_id, user_id, dict(prefs.channels), dict(prefs.categories))


async def opt_out(conn: Conn, tenant_id: str, user_id: str, *, category: str | None) -> None:
    """Opt the user out of `category` (every channel, as /preferences/ keeps categories), or
    with None out of email altogether; what else they saved stays."""
    if category:
        await conn.execute(OPT_OUT_CATEGORY, tenant_id, user_id, category)
    else:
        await conn.execute(OPT_OUT_CHANNEL, tenant_id, user_id, "email")
