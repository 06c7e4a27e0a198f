"""What the purges of every table family share: the cutoff, and one batch by primary key.

Ids notifyd makes are UUIDv7, whose first 48 bits are the creation time in milliseconds, so
the primary key is already an index on creation time: a purge walks it from the oldest row,
`retain_batch` rows a statement, with a cursor (the last id it deleted), and never needs an
index of its own on a time column. The rows are taken `FOR UPDATE SKIP LOCKED`: a row the
request path or a sender holds is left for the next round instead of waited for, and two
instances purging at once take different rows instead of queueing behind each other.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from notifyd.store.pool import Conn, Executor

NIL = uuid.UUID(int=0)  # the cursor before the first row

# pg_try_advisory_lock(int, int): notifyd's class of lock (not the migration's bigint key),
# then one number per table family
LOCK_CLASS = 0x6E6F7479
FAMILIES = (
    "notifications",
    "messages",
    "interview_reminders",
    "audit_log",
    "workflow_runs",
    "webhook_deliveries",
)
TRY_LOCK = "SELECT pg_try_advisory_lock($1::int, $2::int)"
UNLOCK = "SELECT pg_advisory_unlock($1::int, $2::int)"


@dataclass(frozen=True, slots=True)
class Cutoff:
    """Rows older than `at` have expired. `id` is the smallest UUIDv7 of `at`'s millisecond:
    every id made before `at` sorts below it."""

    at: datetime
    id: uuid.UUID


def cutoff(age: float, now: float | None = None) -> Cutoff:
    """The cutoff of a retention of `age` seconds, as of `now` (epoch seconds)."""
    ms = int(((time.time() if now is None else now) - age) * 1000)
    return Cutoff(datetime.fromtimestamp(ms / 1000, UTC), uuid.UUID(int=max(0, ms) << 80))


async def try_lock(conn: Conn, table: str) -> bool:
    """Whether this session now purges `table` (False: another instance does)."""
    return bool(await conn.fetchval(TRY_LOCK, LOCK_CLASS, FAMILIES.index(table)))


async def unlock(conn: Conn, table: str) -> None:
    """Releases the family's lock before the connection goes back to its pool (which keeps
    sessions as they are); if that fails, the connection is closed, and the lock with it."""
    try:
        await conn.execute(UNLOCK, LOCK_CLASS, FAMILIES.index(table))
    except BaseException:
        conn.terminate()
        raise


def purge_statement(table: str, time_column: str, only: str | None = None) -> str:
    """The one purge statement every family runs, for `table`: rows after the cursor `$1`,
    below the cutoff id `$2` and older than the cutoff time `$3` by `time_column`, at most
    `$4`, oldest first, taken `FOR UPDATE SKIP LOCKED`; `only` narrows it (a condition on
    the table's own columns: which rows may ever go). It returns the ids it deleted."""
    narrow = f"\n      AND {only}" if only else ""
    return f"""
WITH doomed AS (
    SELECT id FROM {table}
    WHERE id > $1 AND id < $2 AND {time_column} < $3{narrow}
    ORDER BY id LIMIT $4
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {table} t USING doomed d WHERE t.id = d.id RETURNING t.id
"""


@dataclass(frozen=True, slots=True)
class Batch:
    deleted: int
    last: uuid.UUID | None  # the cursor for the next batch: the highest id deleted


async def purge_batch(
    executor: Executor, sql: str, after: uuid.UUID, cut: Cutoff, limit: int
) -> Batch:
    """Runs one family's purge statement: `$1` cursor, `$2` cutoff id, `$3` cutoff time,
    `$4` batch size; it returns the ids it deleted."""
    rows = await executor.fetch(sql, after, cut.id, cut.at, limit)
    ids = [row[0] for row in rows]
    return Batch(len(ids), max(ids, key=lambda i: i.int) if ids else None)
