"""An admin's requeue of a failed delivery (`POST /notifications/{id}/retry/`, `notifyd dlq
requeue`): the delivery starts over with fresh attempts, audited."""

from __future__ import annotations

import uuid

from notifyd.payloads import DeliveryRef
from notifyd.store import audit, deliveries
from notifyd.store.audit import AuditEntry
from notifyd.store.pool import Conn

RETRY_ACTION = "notification.retry"


async def restart_failed(
    conn: Conn, tenant_id: str, notification_id: uuid.UUID, entry: AuditEntry
) -> str | None:
    """Start a failed (or undelivered) delivery over with fresh attempts, audited; call inside
    a transaction. Returns its channel (the caller enqueues `delivery_ref` on that channel's
    stream after the commit), or None when it was not failed (nothing written)."""
    channel = await deliveries.requeue_failed(conn, tenant_id, notification_id)
    if channel is not None:
        await audit.record(conn, entry)
    return channel


def delivery_ref(tenant_id: str, notification_id: uuid.UUID) -> dict[str, str]:
    """The delivery stream entry a restarted delivery is put back with."""
    return DeliveryRef(tenant_id, str(notification_id)).to_fields()
