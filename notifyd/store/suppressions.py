"""A tenant's suppression list (issue 29; rules in `notifyd.suppressions`).

Entries are added by what learns an address must not be sent to (a sender's refusal, a
Twilio callback, an unsubscribe) and read by the dispatcher with its batch's rows (the
LATERAL join in `store.deliveries.LOAD_MANY_FOR_DISPATCH`), never one query per row. Every
statement names the tenant.
"""

from __future__ import annotations

import uuid

import asyncpg

from notifyd.ids import uuid7
from notifyd.store.pool import Executor
from notifyd.suppressions import address_key, bounded

COLUMNS = "id, channel, address, category, reason, source, notification_id, created_at"

# The first reason stays: a later one for the same (address, category) changes nothing.
# ids from `notifyd.ids.uuid7` (monotonic in this process), so entries made within one
# millisecond still list newest first; the column's default (notifyd_uuid7()) is not
ADD = """
INSERT INTO suppressions (tenant_id, channel, address, category, reason, source,
                          notification_id, id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (tenant_id, channel, address, category) DO NOTHING
"""

# The address of one of the tenant's notifications (a provider callback names the row, not
# the address: what it says is not trusted for an address); keyed as `address_key` does.
ADD_FOR_NOTIFICATION = """
INSERT INTO suppressions (tenant_id, channel, address, category, reason, source,
                          notification_id, id)
SELECT n.tenant_id, n.channel,
       CASE n.channel WHEN 'email' THEN lower(btrim(n.recipient)) ELSE btrim(n.recipient) END,
       '', $4, $5, n.id, $6
FROM notifications n
WHERE n.tenant_id = $1 AND n.id = $2 AND n.channel = $3
ON CONFLICT (tenant_id, channel, address, category) DO NOTHING
"""

LIST = f"""
SELECT {COLUMNS} FROM suppressions
WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id < $2)
ORDER BY id DESC LIMIT $3
"""

# every category's entry of the address: it may be sent to again
REMOVE = f"""
DELETE FROM suppressions WHERE tenant_id = $1 AND channel = $2 AND address = $3
RETURNING {COLUMNS}
"""


async def add(
    executor: Executor,
    tenant_id: str,
    channel: str,
    address: str,
    reason: str,
    source: str,
    *,
    category: str | None = None,
    notification_id: uuid.UUID | str | None = None,
) -> bool:
    """Put the address on the list (for `category` only, when given); False when it was
    already there for that scope."""
    nid = uuid.UUID(notification_id) if isinstance(notification_id, str) else notification_id
    status = await executor.execute(
        ADD,
        tenant_id,
        channel,
        address_key(channel, address),
        category or "",
        reason,
        bounded(source),
        nid,
        uuid7(),
    )
    return status.rsplit(" ", 1)[1] != "0"


async def add_for_notification(
    executor: Executor,
    tenant_id: str,
    notification_id: uuid.UUID,
    channel: str,
    reason: str,
    source: str,
) -> bool:
    """Put the recipient of the tenant's notification on the list, for every category;
    False when there is no such notification or its address was there already."""
    status = await executor.execute(
        ADD_FOR_NOTIFICATION, tenant_id, notification_id, channel, reason, bounded(source), uuid7()
    )
    return status.rsplit(" ", 1)[1] != "0"


async def page(
    executor: Executor, tenant_id: str, before: uuid.UUID | None, limit: int
) -> list[asyncpg.Record]:
    return list(await executor.fetch(LIST, tenant_id, before, limit))


async def remove(
    executor: Executor, tenant_id: str, channel: str, address: str
) -> list[asyncpg.Record]:
    """Take the address off the list (every category); the entries removed."""
    return list(await executor.fetch(REMOVE, tenant_id, channel, address_key(channel, address)))
