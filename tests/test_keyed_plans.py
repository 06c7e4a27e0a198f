"""The dispatcher's keyed statements (`store.pool.KEYED_SETTINGS`) keep one plan per
connection, and that plan finds every row through its primary key whatever the tables held
when it was made.

A generic plan made on an empty table is why the queue pool plans every execution
(`store.pool.QUEUE_SETTINGS`): PostgreSQL prices a sequential scan and a hash join as
cheapest there, caches them, and keeps seq-scanning the queue as it grows. The keyed pool's
settings price those out, so the plan made on a fresh deployment is the index plan: checked
here on empty tables, the worst case, with the plan PostgreSQL keeps (`EXPLAIN EXECUTE` of a
prepared statement on a keyed connection).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from notifyd.settings import Settings
from notifyd.store.deliveries import (
    DISPATCH_MANY,
    LISTED_MANY,
    LOAD_MANY_FOR_DISPATCH,
    SEND_QUEUED_MANY,
)
from notifyd.store.pool import close_pool, create_pool

KEYED_STATEMENTS = {
    "load": LOAD_MANY_FOR_DISPATCH,
    "listed": LISTED_MANY,
    "send_queued": SEND_QUEUED_MANY,
    "dispatch": DISPATCH_MANY,
}


@pytest.mark.parametrize("name", sorted(KEYED_STATEMENTS))
async def test_a_keyed_statement_planned_on_empty_tables_reads_by_primary_key(
    settings_factory: Callable[..., Settings], name: str
) -> None:
    pool = await create_pool(settings_factory(), keyed=True)
    try:
        async with pool.acquire() as conn:
            statement = await conn.prepare(KEYED_STATEMENTS[name])
            nulls = ", ".join(f"NULL::{t.name}" for t in statement.get_parameters())
            await conn.execute(f"PREPARE probe AS {KEYED_STATEMENTS[name]}")
            rows = await conn.fetch(f"EXPLAIN (VERBOSE) EXECUTE probe({nulls})")
            await conn.execute("DEALLOCATE probe")
    finally:
        await close_pool(pool)
    plan = "\n".join(row[0] for row in rows)
    assert "$1" in plan, f"not the generic plan a connection keeps:\n{plan}"
    assert "notifications_pkey" in plan, f"{name}: no probe of the primary key:\n{plan}"
    for shape in ("Seq Scan on", "Hash Join", "Merge Join"):
        assert shape not in plan, f"{name}: {shape!r} in the kept plan:\n{plan}"


async def test_the_keyed_pool_is_small_and_its_settings_are_its_own(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(NOTIFYD_DB_KEYED_POOL_MAX="3")
    keyed = await create_pool(settings, keyed=True)
    queue = await create_pool(settings, queue=True)
    try:
        assert keyed.get_max_size() == 3
        assert await keyed.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
        assert await keyed.fetchval("SHOW enable_seqscan") == "off"
        assert await queue.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
        assert await queue.fetchval("SHOW enable_seqscan") == "on"
    finally:
        await close_pool(keyed)
        await close_pool(queue)
