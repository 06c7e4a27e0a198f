"""The dispatcher's keyed statements (`store.pool.keyed`) keep one plan per connection, and
that plan finds every row through an index whatever the table's size when it was made.

A generic plan made on an empty table is what made the queue pool plan every execution
(`store.pool.QUEUE_SETTINGS`): PostgreSQL then prices a sequential scan and a hash join as
cheapest, caches them, and keeps seq-scanning the queue as it grows. The keyed transaction's
settings price those out, so the plan made on a fresh deployment is the index plan: checked
here on empty tables, the worst case, with the plan PostgreSQL caches (`EXPLAIN EXECUTE` of
a prepared statement under `force_generic_plan`).
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from notifyd.settings import Settings
from notifyd.store.deliveries import (
    DISPATCH_MANY,
    LISTED_MANY,
    LOAD_MANY_FOR_DISPATCH,
    SEND_QUEUED_MANY,
)
from notifyd.store.pool import close_pool, create_pool, keyed

KEYED_STATEMENTS = {
    "load": LOAD_MANY_FOR_DISPATCH,
    "listed": LISTED_MANY,
    "send_queued": SEND_QUEUED_MANY,
    "dispatch": DISPATCH_MANY,
}


@pytest.mark.parametrize("name", sorted(KEYED_STATEMENTS))
async def test_a_keyed_statement_planned_on_empty_tables_reads_by_index(
    settings_factory: Callable[..., Settings], name: str
) -> None:
    pool = await create_pool(settings_factory(), queue=True)
    try:
        async with keyed(pool) as conn:
            statement = await conn.prepare(KEYED_STATEMENTS[name])
            nulls = ", ".join(f"NULL::{t.name}" for t in statement.get_parameters())
            await conn.execute(f"PREPARE probe AS {KEYED_STATEMENTS[name]}")
            rows = await conn.fetch(f"EXPLAIN (VERBOSE) EXECUTE probe({nulls})")
            await conn.execute("DEALLOCATE probe")
    finally:
        await close_pool(pool)
    plan = "\n".join(row[0] for row in rows)
    assert "$1" in plan, f"not the generic plan a connection keeps:\n{plan}"
    for shape in ("Seq Scan on notifications", "Hash Join", "Merge Join", "Seq Scan on"):
        assert shape not in plan, f"{name}: {shape!r} in the kept plan:\n{plan}"


async def _write_then_fail(pool: asyncpg.Pool) -> None:
    async with keyed(pool) as conn:
        await conn.execute(
            "INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body) "
            "VALUES (gen_random_uuid(), 'TEN-K', 'svc', 'in_app', 'u1', 'hi')"
        )
        raise RuntimeError("the block fails after its write")


async def test_a_keyed_block_that_raises_changes_nothing(
    settings_factory: Callable[..., Settings],
) -> None:
    """All or nothing, like any transaction: the rows a failed block wrote are rolled back,
    and its connection goes back to the pool clean (the next block on it starts afresh)."""
    pool = await create_pool(settings_factory(), queue=True)
    try:
        with pytest.raises(RuntimeError):
            await _write_then_fail(pool)
        async with keyed(pool) as conn:
            assert await conn.fetchval("SELECT count(*) FROM notifications") == 0
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
        assert await pool.fetchval("SHOW enable_seqscan") == "on"  # LOCAL: the block's only
    finally:
        await close_pool(pool)
