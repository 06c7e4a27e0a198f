"""A batch of 64 state transitions must cost 64 primary-key probes however large the backlog.

The tables behind the queue change faster than their statistics: right after an outage the
planner still believes few rows are in flight, and a status guard it can match to a partial
index (`notifications_in_flight_idx`, `reminders_due_idx`) tempts it to walk that index, which
by then holds the whole backlog. These tests build exactly that situation (statistics taken
on a quiet table, then a backlog of thousands of rows it has not seen) and read the plans.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from notifyd.actors.dispatcher import Dispatcher
from notifyd.app import Daemon
from notifyd.ids import uuid7
from notifyd.store import deliveries, reminders

TENANT = "TEN-0001"
BACKLOG = 6_000  # rows per in-flight status, unseen by the statistics
BATCH = 64


def _index_names(plan: Any) -> set[str]:
    """Every index any node of an EXPLAIN (FORMAT JSON) plan reads."""
    found: set[str] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "Index Name" in node:
                found.add(node["Index Name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


async def _plan_indexes(db: asyncpg.Connection, statement: str, *args: Any) -> set[str]:
    raw = await db.fetchval("EXPLAIN (FORMAT JSON) " + statement, *args)
    return _index_names(json.loads(raw) if isinstance(raw, str) else raw)


async def _stale_backlog_of_notifications(db: asyncpg.Connection) -> dict[str, list[uuid.UUID]]:
    """A quiet table analysed, then a backlog in every in-flight state the planner never saw."""
    await db.execute("ALTER TABLE notifications SET (autovacuum_enabled = false)")
    quiet = [uuid7() for _ in range(100)]
    await db.execute(
        """INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body, status)
           SELECT id, $2, 'svc', 'in_app', 'u-1', 'hello', 'sent' FROM unnest($1::uuid[]) AS id""",
        quiet,
        TENANT,
    )
    await db.execute("ANALYZE notifications")
    by_status: dict[str, list[uuid.UUID]] = {}
    for status in ("queued", "dispatched", "sending"):
        ids = [uuid7() for _ in range(BACKLOG)]
        await db.execute(
            """INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body,
                                          status, attempts)
               SELECT id, $2, 'svc', 'in_app', 'u-' || (random() * 50)::int, 'hello', $3, 1
               FROM unnest($1::uuid[]) AS id""",
            ids,
            TENANT,
            status,
        )
        by_status[status] = ids
    return by_status


async def test_delivery_batches_probe_the_primary_key_under_a_backlog(
    db: asyncpg.Connection,
) -> None:
    backlog = await _stale_backlog_of_notifications(db)
    tenants = [TENANT] * BATCH
    texts: list[str | None] = ["hello"] * BATCH
    nothing: list[str | None] = [None] * BATCH
    queued = backlog["queued"][-BATCH:]
    cases = {
        "SEND_QUEUED_MANY": (
            deliveries.SEND_QUEUED_MANY,
            (tenants, queued, nothing, texts, nothing, ["1-0"] * BATCH),
        ),
        "DISPATCH_MANY": (deliveries.DISPATCH_MANY, (tenants, queued, nothing, texts, nothing)),
        "CLAIM_MANY": (deliveries.CLAIM_MANY, (tenants, backlog["dispatched"][-BATCH:], 30.0)),
        "MARK_MANY_SENT": (
            deliveries.MARK_MANY_SENT,
            (tenants, backlog["sending"][-BATCH:], [1] * BATCH, nothing),
        ),
    }
    for name, (statement, args) in cases.items():
        used = await _plan_indexes(db, statement, *args)
        assert "notifications_in_flight_idx" not in used, (name, used)
        assert "notifications_pkey" in used, (name, used)
    # and the guard still picks exactly the rows it was given
    changed = await db.fetch(deliveries.SEND_QUEUED_MANY, *cases["SEND_QUEUED_MANY"][1])
    assert {r["id"] for r in changed} == set(queued)
    assert await db.fetchval("SELECT count(*) FROM notifications WHERE status = 'queued'") == (
        BACKLOG - BATCH
    )


async def test_firing_reminders_probes_the_primary_key_under_a_backlog(
    db: asyncpg.Connection,
) -> None:
    await db.execute("ALTER TABLE interview_reminders SET (autovacuum_enabled = false)")
    now = datetime.now(UTC)
    insert = """
        INSERT INTO interview_reminders (id, tenant_id, application_id, candidate_id, employer_id,
                                         created_by, interview_time, reminder_time, status)
        SELECT id, $2, 'app', 'cand', 'emp', 'svc', $3, $4, $5 FROM unnest($1::uuid[]) AS id"""
    hour, second = timedelta(hours=1), timedelta(seconds=1)
    quiet = [uuid7() for _ in range(100)]
    await db.execute(insert, quiet, TENANT, now - hour, now - 2 * hour, "fired")
    await db.execute("ANALYZE interview_reminders")
    ids = [uuid7() for _ in range(3 * BACKLOG)]
    await db.execute(insert, ids, TENANT, now + hour, now - second, "scheduled")
    due = ids[-BATCH:]
    notification_ids = [uuid7() for _ in due]
    args = (
        [TENANT] * BATCH,
        due,
        [now] * BATCH,
        [now + timedelta(hours=1)] * BATCH,
        [uuid7() for _ in due],
        due,
        notification_ids,
        ["cand"] * BATCH,
        ["in_app"] * BATCH,
        ["cand"] * BATCH,
        [{}] * BATCH,
        [None] * BATCH,
        5.0,
        "interview_reminder",
        "reminders",
    )
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    used = await _plan_indexes(db, reminders.FIRE_MANY, *args)
    assert "reminders_due_idx" not in used, used
    assert "interview_reminders_pkey" in used, used
    fired = await db.fetch(reminders.FIRE_MANY, *args)
    assert {r["id"] for r in fired} == set(due)


async def test_the_queue_is_planned_per_execution_and_the_api_keeps_cached_plans(
    daemon: Daemon,
) -> None:
    """A generic plan cached while the queue was empty (a fresh deploy, then a burst) kept
    seq-scanning it for the whole of a 20 s benchmark as it grew past 100,000 rows, until an
    ANALYZE would have invalidated it: the actors' connections never cache one. The API's
    connections do, because planning every single-row read costs more than it could save."""
    assert daemon.pipeline is not None
    dispatcher = next(a for a in daemon.pipeline.actors if isinstance(a, Dispatcher))
    queue_pool: asyncpg.Pool = dispatcher._pool
    assert await queue_pool.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
    # its batches by key keep index-only plans (tests/test_keyed_plans.py)
    keyed_pool: asyncpg.Pool = dispatcher._keyed_pool
    assert keyed_pool is not queue_pool
    assert await keyed_pool.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    assert daemon.services is not None
    api_pool = daemon.services.pool
    assert api_pool is not queue_pool
    assert await api_pool.fetchval("SHOW plan_cache_mode") == "auto"
