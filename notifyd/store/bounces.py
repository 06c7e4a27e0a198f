"""What a bounce or complaint changes (issue 29; `notifyd.bounces` reads the reports).

Each function takes the notification a VERP path named and changes it only when the report
is about that notification's own recipient; each runs in the caller's transaction, with the
suppression and the webhook event it causes. `bounced` and `complained` are no status the
notifications trigger maps to an event, so the event is fanned out here, with the same data.
"""

from __future__ import annotations

import uuid

import asyncpg

from notifyd.store import suppressions
from notifyd.store.pool import Conn
from notifyd.suppressions import bounded

ROW = """
SELECT tenant_id, id, recipient, category, status FROM notifications
WHERE id = $1 AND channel = 'email' FOR UPDATE
"""

# from `sending` too: a DSN may come back before the sender recorded the relay's 250
BOUNCED = """
UPDATE notifications SET status = 'bounced', last_error = $2, updated_at = now()
WHERE id = $1 AND status IN ('sending', 'sent', 'delivered')
"""

DELAYED = """
UPDATE notifications SET last_error = $2, updated_at = now()
WHERE id = $1 AND status IN ('sent', 'delivered')
"""

# the notifications trigger's event data (0013), for the events it does not map
FAN_OUT = """
SELECT webhook_fan_out(n.tenant_id, $2, jsonb_build_object(
    'notification_id', n.id, 'channel', n.channel, 'status', n.status,
    'recipient', n.recipient, 'user_id', n.user_id, 'category', n.category,
    'template_key', n.template_key, 'critical', n.critical, 'attempts', n.attempts,
    'last_error', n.last_error, 'provider_message_id', n.provider_message_id,
    'read_at', n.read_at))
FROM notifications n WHERE n.id = $1 AND webhook_wanted(n.tenant_id, $2)
"""


def _address(row: asyncpg.Record) -> str:
    return str(row["recipient"]).strip().lower()


async def bounce(
    conn: Conn,
    notification_id: uuid.UUID,
    permanent: frozenset[str],
    temporary: frozenset[str],
    detail: str,
) -> str | None:
    """A DSN about the notification: `bounced` + a `hard_bounce` suppression when it failed
    for good, `last_error` noted when only delayed. Returns what was done, None when the
    report is not about this notification's recipient."""
    row = await conn.fetchrow(ROW, notification_id)
    if row is None:
        return None
    address = _address(row)
    if address in permanent:
        reason = bounded(f"bounced: {detail}")
        if await conn.execute(BOUNCED, notification_id, reason) != "UPDATE 0":
            await conn.execute(FAN_OUT, notification_id, "notification.bounced")
        await suppressions.add(
            conn,
            row["tenant_id"],
            "email",
            address,
            "hard_bounce",
            detail,
            notification_id=notification_id,
        )
        return "bounced"
    if address in temporary:
        await conn.execute(DELAYED, notification_id, bounded(f"delayed: {detail}"))
        return "delayed"
    return None


async def complaint(conn: Conn, notification_id: uuid.UUID, detail: str) -> str | None:
    """An ARF complaint about the notification: its address suppressed for its category
    (every category when it had none), and a `notification.complained` event."""
    row = await conn.fetchrow(ROW, notification_id)
    if row is None:
        return None
    await suppressions.add(
        conn,
        row["tenant_id"],
        "email",
        _address(row),
        "complaint",
        detail,
        category=row["category"],
        notification_id=notification_id,
    )
    await conn.execute(FAN_OUT, notification_id, "notification.complained")
    return "complained"
