"""`notifyd reminders list`: reminders due before a time, from PostgreSQL (the truth the
timer wheel is rebuilt from), across tenants or for one.

The JSON form is the REST API's reminder (plus `tenant_id`), so a script can use either.
"""

from __future__ import annotations

import sys
from datetime import datetime

import asyncpg

from notifyd.http.reminders import reminder_json
from notifyd.operator import connect
from notifyd.operator.output import print_json, table
from notifyd.schemas.fields import parse_rfc3339
from notifyd.settings import Settings
from notifyd.store import reminders as store
from notifyd.store.pool import Executor

ANY_STATUS = "all"

# With status 'scheduled' (the default) this reads the wheel's own index (reminders_due_idx).
DUE_BEFORE = f"""
SELECT {store.COLUMNS} FROM interview_reminders
WHERE reminder_time < $1
  AND ($2::text IS NULL OR tenant_id = $2)
  AND ($3::text IS NULL OR status = $3)
ORDER BY reminder_time, id
LIMIT $4
"""


async def due_before(
    executor: Executor,
    before: datetime,
    *,
    tenant_id: str | None,
    status: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    """Soonest first; `status=None` is every status."""
    return await executor.fetch(DUE_BEFORE, before, tenant_id, status, limit)


async def list_command(
    settings: Settings,
    *,
    due_before_text: str,
    tenant_id: str | None,
    status: str,
    limit: int,
    as_json: bool,
) -> int:
    # RFC 3339 with an offset, as a reminder's times over REST: a time without one would
    # silently mean the host's zone
    before = parse_rfc3339(due_before_text.strip())
    if before is None:
        print(
            f"notifyd reminders list: --due-before {due_before_text!r} is not an ISO 8601 time "
            "with an offset, e.g. 2026-03-10T10:00:00Z",
            file=sys.stderr,
        )
        return connect.REFUSED
    async with connect.postgres(settings) as pool:
        rows = await due_before(
            pool,
            before,
            tenant_id=tenant_id,
            status=None if status == ANY_STATUS else status,
            limit=limit + 1,
        )
    more = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        print_json(
            {
                "reminders": [{"tenant_id": r["tenant_id"], **reminder_json(r)} for r in rows],
                "more": more,
            }
        )
        return connect.OK
    if rows:
        headers = ("ID", "TENANT", "REMINDER AT", "INTERVIEW AT", "STATUS", "APPLICATION")
        print(
            table(
                headers,
                [
                    (
                        r["id"],
                        r["tenant_id"],
                        r["reminder_time"],
                        r["interview_time"],
                        r["status"],
                        r["application_id"],
                    )
                    for r in rows
                ],
            )
        )
    which = "any status" if status == ANY_STATUS else status
    scope = f"tenant {tenant_id}" if tenant_id else "all tenants"
    print(f"{len(rows)} reminder(s) due before {before.isoformat()} ({which}, {scope})")
    if more:
        print(f"more match: raise --limit (now {limit})")
    return connect.OK
