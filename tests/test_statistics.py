"""Planner statistics follow a table that grows fast (`store.statistics`, run by the
housekeeper each round).

The pools keep generic plans made from the statistics a table had when a connection first
ran the statement; on a young table growing fast those said "nearly empty" for minutes (a
mark-as-read by ids then walked the whole tenant's notifications). Promises checked: a table
that changed more rows than it holds (never analyzed: more than `MIN_CHANGED`) is analyzed
in the housekeeper's round, once; one that grew by less than its size is not; other tables
are left alone.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from notifyd.actors.housekeeper import Housekeeper
from notifyd.settings import Settings
from notifyd.store.pool import close_pool, create_pool
from notifyd.store.statistics import MIN_CHANGED
from tests.helpers import wait_for

CHANGED = """
SELECT n_mod_since_analyze, analyze_count FROM pg_stat_user_tables WHERE relname = $1
"""


@pytest.fixture
async def housekeeper(settings_factory: Callable[..., Settings]) -> AsyncIterator[Housekeeper]:
    pool = await create_pool(settings_factory(), queue=True)
    try:
        yield Housekeeper(pool, ttl=86_400.0, interval=60)
    finally:
        await close_pool(pool)


async def add_notifications(db: asyncpg.Connection, count: int) -> None:
    await db.execute(
        """
        INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient,
                                   body, status)
        SELECT ($2::uuid[])[g], 'TEN-1', 'svc', 'u-' || g, 'in_app', 'u-' || g, 'hello', 'sent'
        FROM generate_series(1, $1) g
        """,
        count,
        [uuid.uuid4() for _ in range(count)],
    )


async def changed_since_analyze(db: asyncpg.Connection, table: str, at_least: int) -> int:
    """Once PostgreSQL's statistics show `at_least` rows changed (they arrive within about a
    second of the commit): how many times the table was analyzed."""

    async def seen() -> bool:
        await db.execute("SELECT pg_stat_clear_snapshot()")
        row = await db.fetchrow(CHANGED, table)
        return row is not None and row["n_mod_since_analyze"] >= at_least

    await wait_for(seen, timeout=10, interval=0.2)
    return int((await db.fetchrow(CHANGED, table))["analyze_count"])


async def test_a_table_that_outgrew_its_statistics_is_analyzed_once(
    housekeeper: Housekeeper, db: asyncpg.Connection
) -> None:
    await add_notifications(db, MIN_CHANGED + 500)
    assert await changed_since_analyze(db, "notifications", MIN_CHANGED + 500) == 0

    assert await housekeeper.refresh_statistics() == ["notifications"]
    await db.execute("SELECT pg_stat_clear_snapshot()")
    row = await db.fetchrow(CHANGED, "notifications")
    assert (row["n_mod_since_analyze"], row["analyze_count"]) == (0, 1)
    assert await db.fetchval("SELECT reltuples FROM pg_class WHERE relname = 'notifications'") > 0
    assert await housekeeper.refresh_statistics() == []  # nothing changed since


async def test_a_table_that_grew_by_less_than_its_size_keeps_its_statistics(
    housekeeper: Housekeeper, db: asyncpg.Connection
) -> None:
    await add_notifications(db, 2 * MIN_CHANGED)
    await changed_since_analyze(db, "notifications", 2 * MIN_CHANGED)
    assert await housekeeper.refresh_statistics() == ["notifications"]
    await add_notifications(db, MIN_CHANGED + 100)  # changed: more than 1,000, less than 2,000
    assert await changed_since_analyze(db, "notifications", MIN_CHANGED + 100) == 1
    assert await housekeeper.refresh_statistics() == []
    await add_notifications(db, MIN_CHANGED)  # now more rows changed than it held
    assert await changed_since_analyze(db, "notifications", 2 * MIN_CHANGED + 100) == 1
    assert await housekeeper.refresh_statistics() == ["notifications"]


async def test_a_table_with_few_changes_is_left_to_autovacuum(
    housekeeper: Housekeeper, db: asyncpg.Connection
) -> None:
    await add_notifications(db, 50)
    await changed_since_analyze(db, "notifications", 50)
    assert await housekeeper.refresh_statistics() == []
