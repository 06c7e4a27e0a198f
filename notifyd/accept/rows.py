"""A prepared order as the outbox row it becomes, and that row's audit row.

Both are stored together, in one statement, by `store.notifications.insert_many_audited`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from notifyd.accept.prepare import Prepared
from notifyd.ids import uuid7
from notifyd.store.audit import AuditEntry, Author
from notifyd.store.notifications import NewNotification

SEND_ACTION = "notification.send"


def new_row(
    prepared: Prepared,
    *,
    tenant_id: str,
    created_by: str,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> NewNotification:
    """The outbox row (`queued`) of `prepared`, with a new id."""
    order, rendered = prepared.order, prepared.rendered
    return NewNotification(
        id=uuid7(),
        tenant_id=tenant_id,
        created_by=created_by,
        user_id=prepared.recipient if order.channel == "in_app" else order.user_id,
        channel=order.channel,
        recipient=prepared.recipient,
        subject=rendered.subject,
        body=rendered.text,
        html_body=rendered.html,
        template_key=order.template_key,
        context=order.context,
        locale=order.locale,
        category=order.category,
        critical=order.critical,
        idempotency_key=idempotency_key,
        request_id=request_id,
    )


def audit_details(row: NewNotification) -> dict[str, Any]:
    """What the audit row of a send says (no content: that stays in the row)."""
    return {
        "notification_id": str(row.id),
        "channel": row.channel,
        "recipient": row.recipient,
        "template_key": row.template_key,
    }


def authored(
    prepared: Sequence[Prepared], tenant_id: str, author: Author
) -> tuple[list[NewNotification], list[AuditEntry]]:
    """The rows of `prepared` for a caller outside a request (the CLI, ingestion): `author`'s
    user is each row's `created_by` and its audit row's user."""
    rows = [new_row(p, tenant_id=tenant_id, created_by=author.user_id) for p in prepared]
    return rows, [author.entry(tenant_id, SEND_ACTION, audit_details(row)) for row in rows]
