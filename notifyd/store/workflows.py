"""Workflows: definitions, runs and their steps. A step row is the truth: the timer wheel
holds only a pointer to it and is rebuilt from `workflow_steps` after Redis lost its data.

Firing and cancelling a step serialise on the step's row lock: the firer locks the row
(`SELECT … FOR UPDATE`) and writes its outcome in the same transaction, a cancel is one
guarded UPDATE (`status = 'pending'`), so whichever comes second sees what the first did.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from notifyd.ids import uuid7
from notifyd.store import retention
from notifyd.store.pool import Conn, Executor

# ---------------------------------------------------------------- definitions

DEFINITION_COLUMNS = "workflow_key, definition, created_at, updated_at"

PUT = f"""
INSERT INTO workflows (tenant_id, workflow_key, definition)
SELECT $1, $2, $3
WHERE EXISTS (SELECT 1 FROM workflows WHERE tenant_id = $1 AND workflow_key = $2)
   OR (SELECT count(*) FROM workflows WHERE tenant_id = $1) < $4
ON CONFLICT (tenant_id, workflow_key)
DO UPDATE SET definition = EXCLUDED.definition, updated_at = now()
RETURNING {DEFINITION_COLUMNS}
"""

GET = f"SELECT {DEFINITION_COLUMNS} FROM workflows WHERE tenant_id = $1 AND workflow_key = $2"

LIST = f"""
SELECT {DEFINITION_COLUMNS} FROM workflows WHERE tenant_id = $1 ORDER BY workflow_key LIMIT $2
"""

DELETE = "DELETE FROM workflows WHERE tenant_id = $1 AND workflow_key = $2 RETURNING 1"


async def put(
    conn: Conn, tenant_id: str, key: str, definition: dict[str, Any], max_per_tenant: int
) -> asyncpg.Record | None:
    """Create or replace; None when the tenant already has `max_per_tenant` other ones."""
    return await conn.fetchrow(PUT, tenant_id, key, definition, max_per_tenant)


async def get(executor: Executor, tenant_id: str, key: str) -> asyncpg.Record | None:
    return await executor.fetchrow(GET, tenant_id, key)


async def list_all(executor: Executor, tenant_id: str, limit: int) -> list[asyncpg.Record]:
    return await executor.fetch(LIST, tenant_id, limit)


async def delete(conn: Conn, tenant_id: str, key: str) -> bool:
    """Runs already started keep their copy of the definition and go on."""
    return await conn.fetchval(DELETE, tenant_id, key) is not None


# ---------------------------------------------------------------- runs and steps

RUN_COLUMNS = """r.id, r.tenant_id, r.workflow_key, r.recipient, r.data, r.critical,
    r.cancel_key, r.status, r.created_by, r.starts_at, r.created_at, r.updated_at,
    r.digest_key, r.digest_closes_at, r.digest_items"""

STEP_COLUMNS = """s.run_id, s.position, s.channel, s.template_key, s.unless, s.status,
    s.reason, s.due_at, s.done_at, s.lateness_ms, s.notification_ids"""


@dataclass(frozen=True, slots=True)
class NewStep:
    position: int
    channel: str
    template_key: str
    unless: list[str]
    due_at: datetime
    status: str = "pending"
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class NewRun:
    id: uuid.UUID
    tenant_id: str
    workflow_key: str
    recipient: str
    definition: dict[str, Any]
    data: dict[str, Any]
    critical: bool
    cancel_key: str | None
    created_by: str
    starts_at: datetime
    steps: list[NewStep]
    status: str = "active"
    digest_key: str | None = None  # a digest run: its first item is `data`
    digest_closes_at: datetime | None = None


INSERT_RUNS = """
INSERT INTO workflow_runs (id, tenant_id, workflow_key, recipient, definition, data, critical,
                           cancel_key, created_by, starts_at, status, digest_key,
                           digest_closes_at, digest_items)
SELECT i.*, CASE WHEN i.digest_key IS NULL THEN 0 ELSE 1 END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[],
            $7::boolean[], $8::text[], $9::text[], $10::timestamptz[], $11::text[],
            $12::text[], $13::timestamptz[])
    AS i(id, tenant_id, workflow_key, recipient, definition, data, critical, cancel_key,
         created_by, starts_at, status, digest_key, digest_closes_at)
"""

# a new digest run's first item: the data of the trigger that opened it
FIRST_ITEMS = """
INSERT INTO workflow_run_items (run_id, seq, tenant_id, data)
SELECT id, 1, tenant_id, data FROM workflow_runs WHERE id = ANY($1::uuid[])
"""

INSERT_STEPS = """
INSERT INTO workflow_steps (run_id, position, tenant_id, channel, template_key, unless,
                            due_at, status, reason, done_at)
SELECT i.run_id, i.position, i.tenant_id, i.channel, i.template_key,
       string_to_array(i.unless, ','), i.due_at, i.status, i.reason,
       CASE WHEN i.status = 'pending' THEN NULL ELSE now() END
FROM unnest($1::uuid[], $2::smallint[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::timestamptz[], $8::text[], $9::text[])
    AS i(run_id, position, tenant_id, channel, template_key, unless, due_at, status, reason)
"""


async def insert_runs(conn: Conn, runs: Sequence[NewRun]) -> None:
    """The runs and every step of each, in two statements; call inside a transaction."""
    await conn.execute(
        INSERT_RUNS,
        [r.id for r in runs],
        [r.tenant_id for r in runs],
        [r.workflow_key for r in runs],
        [r.recipient for r in runs],
        [r.definition for r in runs],
        [r.data for r in runs],
        [r.critical for r in runs],
        [r.cancel_key for r in runs],
        [r.created_by for r in runs],
        [r.starts_at for r in runs],
        [r.status for r in runs],
        [r.digest_key for r in runs],
        [r.digest_closes_at for r in runs],
    )
    digests = [r.id for r in runs if r.digest_key is not None]
    if digests:
        await conn.execute(FIRST_ITEMS, digests)
    steps = [(r, s) for r in runs for s in r.steps]
    await conn.execute(
        INSERT_STEPS,
        [r.id for r, _ in steps],
        [s.position for _, s in steps],
        [r.tenant_id for r, _ in steps],
        [s.channel for _, s in steps],
        [s.template_key for _, s in steps],
        [",".join(s.unless) for _, s in steps],  # a list per step: no ragged arrays
        [s.due_at for _, s in steps],
        [s.status for _, s in steps],
        [s.reason for _, s in steps],
    )


# Throttle: the recipients' locks (in one order, so concurrent triggers cannot deadlock),
# held to the end of the transaction, then how many runs each already has in the window. A
# second trigger for the same recipient waits for the first to commit and counts its runs.
LOCK_RECIPIENTS = """
SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2 || chr(31) || r, 0))
FROM unnest($3::text[]) AS r ORDER BY r
"""

RECENT_RUNS = """
SELECT recipient, count(*) AS runs FROM workflow_runs
WHERE tenant_id = $1 AND workflow_key = $2 AND recipient = ANY($3::text[])
  AND status <> 'throttled' AND created_at > now() - make_interval(secs => $4)
GROUP BY recipient
"""


async def lock_recipients(conn: Conn, tenant_id: str, key: str, recipients: Sequence[str]) -> None:
    """The recipients' locks for this workflow, held until the transaction ends (digests and
    throttles are decided under them)."""
    await conn.execute(LOCK_RECIPIENTS, tenant_id, key, sorted(recipients))


async def recent_runs(
    conn: Conn, tenant_id: str, key: str, recipients: Sequence[str], window: float
) -> dict[str, int]:
    """Runs (not throttled) of each recipient started within the last `window` seconds,
    after taking the recipients' throttle locks; call inside the transaction that inserts
    the new runs."""
    await conn.execute(LOCK_RECIPIENTS, tenant_id, key, list(recipients))
    rows = await conn.fetch(RECENT_RUNS, tenant_id, key, list(recipients), window)
    return {row["recipient"]: row["runs"] for row in rows}


# Digests. The open runs a trigger's data joins, locked: a step of the run that falls due
# closes it first (`CLOSE_DIGEST`, an UPDATE of the same row), so an item is either added
# before the close (and the step, reading the items after it, renders it) or finds the run
# closed on the lock's re-check (clock_timestamp() and `digest_closed` are read again then)
# and goes into a new run: never dropped, never in two runs.
OPEN_DIGESTS = """
SELECT id, recipient FROM workflow_runs
WHERE tenant_id = $1 AND workflow_key = $2 AND recipient = ANY($3::text[])
  AND digest_key = $4 AND NOT digest_closed AND status = 'active'
  AND digest_closes_at > clock_timestamp() AND digest_items < $5
ORDER BY recipient, id DESC
FOR UPDATE
"""

APPEND_ITEMS = """
WITH bumped AS (
    UPDATE workflow_runs SET digest_items = digest_items + 1, updated_at = now()
    WHERE id = ANY($1::uuid[])
    RETURNING id, tenant_id, digest_items
)
INSERT INTO workflow_run_items (run_id, seq, tenant_id, data)
SELECT id, digest_items, tenant_id, $2 FROM bumped
"""

CLOSE_DIGEST = """
UPDATE workflow_runs SET digest_closed = true, updated_at = now()
WHERE tenant_id = $1 AND id = $2 AND NOT digest_closed
"""

ITEMS = """
SELECT data FROM workflow_run_items WHERE tenant_id = $1 AND run_id = $2 ORDER BY seq
"""


async def join_digests(
    conn: Conn,
    tenant_id: str,
    key: str,
    recipients: Sequence[str],
    digest_key: str,
    data: dict[str, Any],
    max_items: int,
) -> dict[str, uuid.UUID]:
    """Adds `data` as the next item of each recipient's open digest run (locked until the
    transaction ends); returns recipient → run id for those that had one. Call under the
    recipients' locks (`lock_recipients`), inside the trigger's transaction."""
    rows = await conn.fetch(OPEN_DIGESTS, tenant_id, key, list(recipients), digest_key, max_items)
    joined: dict[str, uuid.UUID] = {}
    for row in rows:
        joined.setdefault(row["recipient"], row["id"])  # the newest open one
    if joined:
        await conn.execute(APPEND_ITEMS, list(joined.values()), data)
    return joined


async def close_digest(executor: Executor, tenant_id: str, run_id: uuid.UUID) -> list[Any]:
    """Closes a digest run (waiting for a trigger adding to it) and returns its items, in
    order; from here on none is added."""
    await executor.execute(CLOSE_DIGEST, tenant_id, run_id)
    return [row["data"] for row in await executor.fetch(ITEMS, tenant_id, run_id)]


GET_RUN = f"SELECT {RUN_COLUMNS} FROM workflow_runs r WHERE r.tenant_id = $1 AND r.id = $2"

LIST_RUNS = f"""
SELECT {RUN_COLUMNS} FROM workflow_runs r
WHERE r.tenant_id = $1
  AND ($2::text IS NULL OR r.recipient = $2)
  AND ($3::text IS NULL OR r.workflow_key = $3)
  AND ($4::uuid IS NULL OR r.id < $4)
ORDER BY r.id DESC
LIMIT $5
"""

STEPS_OF = f"""
SELECT {STEP_COLUMNS} FROM workflow_steps s
WHERE s.tenant_id = $1 AND s.run_id = ANY($2::uuid[])
ORDER BY s.run_id, s.position
"""


async def get_run(executor: Executor, tenant_id: str, run_id: uuid.UUID) -> asyncpg.Record | None:
    return await executor.fetchrow(GET_RUN, tenant_id, run_id)


async def list_runs(
    executor: Executor,
    tenant_id: str,
    *,
    recipient: str | None,
    workflow_key: str | None,
    before: uuid.UUID | None,
    limit: int,
) -> list[asyncpg.Record]:
    return await executor.fetch(LIST_RUNS, tenant_id, recipient, workflow_key, before, limit)


async def steps_of(
    executor: Executor, tenant_id: str, run_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[asyncpg.Record]]:
    found: dict[uuid.UUID, list[asyncpg.Record]] = {run_id: [] for run_id in run_ids}
    for row in await executor.fetch(STEPS_OF, tenant_id, list(run_ids)):
        found[row["run_id"]].append(row)
    return found


# One statement: every step not yet sent of the matching runs, and the runs themselves. The
# UPDATE waits for the row lock of a step being fired; it then sees that step `sent` (or
# skipped) and leaves it, so a cancel never counts a step that went, and a step never goes
# after a cancel that counted it.
CANCEL = """
WITH runs AS (
    UPDATE workflow_runs r SET status = 'cancelled', updated_at = now()
    WHERE r.tenant_id = $1 AND r.workflow_key = $2 AND r.cancel_key = $3
      AND ($4::text[] IS NULL OR r.recipient = ANY($4::text[]))
      AND r.status = 'active'
    RETURNING r.id
), steps AS (
    UPDATE workflow_steps s SET status = 'cancelled', reason = 'cancelled', done_at = now()
    FROM runs
    WHERE s.run_id = runs.id AND s.status = 'pending'
    RETURNING s.run_id, s.position
)
SELECT run_id, position FROM steps
"""


# The pending steps a cancel is about to stop, locked in the order the firer locks a batch
# (run, position): a cancel and a batch being fired wait for each other, never deadlock.
LOCK_FOR_CANCEL = """
SELECT 1 FROM workflow_steps s JOIN workflow_runs r ON r.id = s.run_id
WHERE r.tenant_id = $1 AND r.workflow_key = $2 AND r.cancel_key = $3
  AND ($4::text[] IS NULL OR r.recipient = ANY($4::text[]))
  AND r.status = 'active' AND s.status = 'pending'
ORDER BY s.run_id, s.position
FOR UPDATE OF s
"""


async def cancel(
    conn: Conn, tenant_id: str, key: str, cancel_key: str, recipients: Sequence[str] | None
) -> list[asyncpg.Record]:
    """(run_id, position) of every step cancelled; call inside a transaction."""
    only = None if recipients is None else list(recipients)
    await conn.execute(LOCK_FOR_CANCEL, tenant_id, key, cancel_key, only)
    return await conn.fetch(CANCEL, tenant_id, key, cancel_key, only)


# ---------------------------------------------------------------- firing

StepKey = tuple[str, uuid.UUID, int]
"""A step's identity: (tenant, run id, position)."""

# What a due step needs: its run, and the recipient's addresses and preferences.
_PEEK_COLUMNS = f"""
SELECT {STEP_COLUMNS}, r.tenant_id, r.workflow_key, r.recipient, r.data, r.critical,
       r.created_by, r.definition->>'category' AS category,
       r.definition->'quiet_hours' AS quiet_hours, r.digest_key,
       c.email, c.phone, c.timezone, c.locale,
       p.channels AS pref_channels, p.categories AS pref_categories
"""
_PEEK_JOINS = """
JOIN workflow_runs r ON r.id = s.run_id
LEFT JOIN recipients c ON c.tenant_id = r.tenant_id AND c.user_id = r.recipient
LEFT JOIN preferences p ON p.tenant_id = r.tenant_id AND p.user_id = r.recipient
"""

PEEK_STEP = (
    _PEEK_COLUMNS
    + "FROM workflow_steps s"
    + _PEEK_JOINS
    + "WHERE s.tenant_id = $1 AND s.run_id = $2 AND s.position = $3"
)

# The keys drive the join and each step is read by its primary key, as in `LOCK_STEPS`: a
# plan that does not depend on the statistics a burst of triggers outruns.
PEEK_STEPS = (
    _PEEK_COLUMNS
    + """FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::uuid[], $3::smallint[]))
     AS k (tenant_id, run_id, position)
JOIN workflow_steps s
  ON s.run_id = k.run_id AND s.position = k.position AND s.tenant_id = k.tenant_id"""
    + _PEEK_JOINS
)

# The lock the fire and a cancel serialise on; read `unless: read` under it, at the step's
# time: an in-app notification an earlier step of this run made, read by now. Every step of
# a wave is locked in one statement, in (run, position) order (as a cancel locks them), so
# two batches or a batch and a cancel never deadlock.
# Written so that its plan does not depend on statistics, which a burst of triggers outruns
# (docs/benchmarks.md, "why step lateness varies"): the wave's keys drive the join, each step
# read by its primary key (an `IN (SELECT … unnest)` became a scan of the whole table), and
# the read probe looks the earlier steps' notifications up by id; its tenant check is kept
# out of the index conditions (`IS TRUE`), where it drew the tenant's creator index.
LOCK_STEPS = """
SELECT s.tenant_id, s.run_id, s.position, s.status,
       EXISTS (
           SELECT 1 FROM notifications n
           WHERE n.id = ANY (ARRAY(
                     SELECT unnest(e.notification_ids) FROM workflow_steps e
                     WHERE e.run_id = s.run_id AND e.position < s.position))
             AND (n.tenant_id = s.tenant_id) IS TRUE
             AND n.channel = 'in_app' AND n.read_at IS NOT NULL
       ) AS read
FROM (SELECT DISTINCT * FROM unnest($1::text[], $2::uuid[], $3::smallint[]))
     AS k (tenant_id, run_id, position)
JOIN workflow_steps s
  ON s.run_id = k.run_id AND s.position = k.position AND s.tenant_id = k.tenant_id
ORDER BY s.run_id, s.position
FOR UPDATE OF s
"""

# Many outcomes and their audit rows in one statement (under `LOCK_STEPS`' locks); a step
# no longer pending is left as it is and absent from the answer.
FINISH_STEPS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::smallint[], $4::text[], $5::text[],
                         $6::uuid[], $7::uuid[])
        AS i(tenant_id, run_id, position, status, reason, notification_id, audit_id)
), finished AS (
    UPDATE workflow_steps s
    SET status = i.status, reason = i.reason, done_at = now(),
        notification_ids = CASE WHEN i.notification_id IS NULL THEN '{}'::uuid[]
                                ELSE ARRAY[i.notification_id] END,
        lateness_ms = GREATEST(0, EXTRACT(EPOCH FROM (now() - s.due_at)) * 1000)::int
    FROM input i
    WHERE s.tenant_id = i.tenant_id AND s.run_id = i.run_id AND s.position = i.position
      AND (s.status = 'pending') IS TRUE
    RETURNING s.tenant_id, s.run_id, s.position, s.status, s.reason, s.lateness_ms, i.audit_id
), logged AS (
    INSERT INTO audit_log (id, tenant_id, user_id, action, details)
    SELECT f.audit_id, f.tenant_id, NULL, 'workflow.step.' || f.status,
           jsonb_build_object('run_id', f.run_id::text, 'position', f.position,
                              'reason', f.reason, 'lateness_ms', f.lateness_ms)
    FROM finished f
    RETURNING 1
)
SELECT tenant_id, run_id, position, status, reason, lateness_ms FROM finished
"""

# Quiet hours: pending steps' new due times and their audit rows in one statement (under
# `LOCK_STEPS`' locks); a step no longer pending is left as it is and absent from the answer.
DEFER_STEPS = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::uuid[], $3::smallint[], $4::timestamptz[], $5::text[],
                         $6::uuid[])
        AS i(tenant_id, run_id, position, until, until_text, audit_id)
), deferred AS (
    UPDATE workflow_steps s SET due_at = i.until, reason = 'quiet_hours'
    FROM input i
    WHERE s.tenant_id = i.tenant_id AND s.run_id = i.run_id AND s.position = i.position
      AND (s.status = 'pending') IS TRUE
    RETURNING s.tenant_id, s.run_id, s.position, s.due_at, i.until_text, i.audit_id
), logged AS (
    INSERT INTO audit_log (id, tenant_id, user_id, action, details)
    SELECT d.audit_id, d.tenant_id, NULL, 'workflow.step.deferred',
           jsonb_build_object('run_id', d.run_id::text, 'position', d.position,
                              'reason', 'quiet_hours', 'until', d.until_text)
    FROM deferred d
    RETURNING 1
)
SELECT tenant_id, run_id, position, due_at FROM deferred
"""


async def defer_steps(
    conn: Conn, deferrals: Sequence[tuple[StepKey, datetime]]
) -> list[asyncpg.Record]:
    """Each pending step due at its new time (the end of quiet hours), audited; the steps
    moved, with their due time (a step no longer pending is absent). Call under
    `lock_steps`' locks."""
    return await conn.fetch(
        DEFER_STEPS,
        [key[0] for key, _ in deferrals],
        [key[1] for key, _ in deferrals],
        [key[2] for key, _ in deferrals],
        [until for _, until in deferrals],
        [until.isoformat() for _, until in deferrals],
        [uuid7() for _ in deferrals],
    )


async def peek_step(
    executor: Executor, tenant_id: str, run_id: uuid.UUID, position: int
) -> asyncpg.Record | None:
    return await executor.fetchrow(PEEK_STEP, tenant_id, run_id, position)


async def peek_steps(executor: Executor, keys: Sequence[StepKey]) -> list[asyncpg.Record]:
    """`peek_step` for many steps in one query (those that exist)."""
    return await executor.fetch(
        PEEK_STEPS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )


async def lock_steps(conn: Conn, keys: Sequence[StepKey]) -> dict[StepKey, asyncpg.Record]:
    """Locks the steps' rows until the transaction ends, in one statement and in (run,
    position) order; the steps that exist, by key, each with its status and whether its
    run's in-app notification was read, as of now."""
    rows = await conn.fetch(
        LOCK_STEPS, [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    )
    return {(row["tenant_id"], row["run_id"], row["position"]): row for row in rows}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a fired step became: `notification_id` is the notification it made, if any."""

    key: StepKey
    status: str
    reason: str | None
    notification_id: uuid.UUID | None
    audit_id: uuid.UUID


async def finish_steps(conn: Conn, outcomes: Sequence[Outcome]) -> list[asyncpg.Record]:
    """The outcomes and their audit rows in one statement (under `lock_steps`' locks); the
    steps finished, with `lateness_ms` (a step no longer pending is absent)."""
    return await conn.fetch(
        FINISH_STEPS,
        [o.key[0] for o in outcomes],
        [o.key[1] for o in outcomes],
        [o.key[2] for o in outcomes],
        [o.status for o in outcomes],
        [o.reason for o in outcomes],
        [o.notification_id for o in outcomes],
        [o.audit_id for o in outcomes],
    )


# Retention: runs triggered before the cutoff with no step pending (sent, skipped, failed,
# cancelled or throttled: a digest still open has its steps pending), oldest first; their
# steps and digest items go with them (ON DELETE CASCADE). Never a run that can still send.
PURGE_EXPIRED = retention.purge_statement(
    "workflow_runs",
    "created_at",
    only="NOT EXISTS (SELECT 1 FROM workflow_steps s "
    "WHERE s.run_id = workflow_runs.id AND s.status = 'pending')",
)


async def purge_expired(
    executor: Executor, after: uuid.UUID, cut: retention.Cutoff, limit: int
) -> retention.Batch:
    """Deletes up to `limit` finished runs triggered before the cutoff, with their steps."""
    return await retention.purge_batch(executor, PURGE_EXPIRED, after, cut, limit)


# Keyset pages over every pending step, for rebuilding the wheel from PostgreSQL.
PENDING_PAGE = """
SELECT tenant_id, run_id, position, due_at FROM workflow_steps
WHERE status = 'pending' AND (due_at, run_id, position) > ($1, $2, $3)
ORDER BY due_at, run_id, position
LIMIT $4
"""

OVERDUE = """
SELECT tenant_id, run_id, position, due_at FROM workflow_steps
WHERE status = 'pending' AND due_at < now() - make_interval(secs => $1)
ORDER BY due_at
LIMIT $2
"""


async def pending_page(
    executor: Executor, after: tuple[datetime, uuid.UUID, int] | None, limit: int
) -> list[asyncpg.Record]:
    start = after or (datetime.min.replace(tzinfo=UTC), uuid.UUID(int=0), -1)
    return await executor.fetch(PENDING_PAGE, *start, limit)


async def overdue(executor: Executor, older_than: float, limit: int) -> list[asyncpg.Record]:
    return await executor.fetch(OVERDUE, older_than, limit)
