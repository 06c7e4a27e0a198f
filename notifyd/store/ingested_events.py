"""Retention of the event ids kept for deduplication (the rows are written by `ingest`)."""

from __future__ import annotations

from notifyd.store.pool import Executor

PURGE = """
DELETE FROM ingested_events
WHERE ctid IN (SELECT ctid FROM ingested_events
               WHERE received_at < now() - make_interval(secs => $1)
               ORDER BY received_at LIMIT $2)
"""


async def purge_older_than(executor: Executor, ttl: float, batch: int) -> int:
    """Forgets up to `batch` event ids received more than `ttl` seconds ago: an event
    published again after that is accepted again."""
    status = await executor.execute(PURGE, ttl, batch)
    return int(status.rsplit(" ", 1)[1])
