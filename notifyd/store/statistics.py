"""Planner statistics that keep up with tables growing fast (the housekeeper's round).

PostgreSQL plans from statistics, and the pools keep plans: the API's and the keyed pool's
connections keep a statement's generic plan (`store.pool`), made from the statistics the
table had then. On a young table that grows fast (a fresh deployment's first hours, a burst
of workflow triggers) those say the table is nearly empty, and a plan made then may walk a
whole tenant's rows by `(tenant_id, …)` where the row's own key was there to use: a
mark-as-read by ids grew from a fraction of a millisecond to tens with the tenant's
notifications (docs/benchmarks.md). Autovacuum's analyze comes only after its own sleep, one
table at a time, and never in a run of a few minutes.

So each round the housekeeper analyzes those tables that changed more rows since their last
analyze than they hold (about: doubled), or `MIN_CHANGED` rows when never analyzed. ANALYZE
samples a bounded number of rows whatever the table's size, and a table doubles only a few
dozen times in its life, so it is cheap; new statistics invalidate the plans made from the
old ones, and each connection plans again. `SKIP_LOCKED`: a table another instance (or
autovacuum) is analyzing is left to it.
"""

from __future__ import annotations

from notifyd.store.pool import Conn

# the tables whose statements the pools keep plans of, or whose plans a wrong size misleads
TABLES = (
    "notifications",
    "messages",
    "audit_log",
    "interview_reminders",
    "workflow_runs",
    "workflow_steps",
    "webhook_deliveries",
)

# a table never analyzed is analyzed once this many rows changed (autovacuum's own base
# threshold is 50; more than that, so a test's or a quiet day's few rows cost nothing)
MIN_CHANGED = 1000

STALE = """
SELECT s.relname
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid
WHERE s.schemaname = current_schema() AND s.relname = ANY($1::text[])
  AND s.n_mod_since_analyze > greatest($2::float8, c.reltuples)
ORDER BY s.relname
"""


async def refresh_stale(conn: Conn, tables: tuple[str, ...] = TABLES) -> list[str]:
    """Analyzes each of `tables` whose statistics a fast growth left behind; the tables
    analyzed."""
    stale = [row["relname"] for row in await conn.fetch(STALE, list(tables), MIN_CHANGED)]
    for table in stale:
        # names from TABLES only, never from input
        await conn.execute(f"ANALYZE (SKIP_LOCKED) {table}")
    return stale
