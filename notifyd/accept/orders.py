"""An order (one notification as asked for) and the field rules it must pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from notifyd.schemas.errors import FieldError, Invalid
from notifyd.schemas.notifications import NotificationSend
from notifyd.schemas.reader import Reader


class Refused(Exception):
    """The order cannot be accepted; nothing was stored."""

    def __init__(self, problems: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = list(problems)


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Order:
    """One notification as asked for (the REST body's fields; `channel` is its
    `notification_type`). For in-app, `recipient` is the user id and `user_id` stays None."""

    channel: str
    recipient: str
    subject: str | None = None
    message: str | None = None
    template_key: str | None = None
    context: dict[str, Any] | None = None
    user_id: str | None = None
    category: str | None = None
    critical: bool = False
    locale: str | None = None


def order_problems(order: Order, send: Reader[NotificationSend]) -> list[FieldError]:
    """Everything wrong with `order`, as the REST route says it about the same body (through
    the same model, `Schemas.send`): for callers whose input did not come through a JSON body
    (the CLI, ingested events)."""
    body = {
        "notification_type": order.channel,
        "recipient": order.recipient,
        "subject": order.subject,
        "message": order.message,
        "template_key": order.template_key,
        "context": order.context,
        "user_id": order.user_id,
        "category": order.category,
        "critical": order.critical,
        "locale": order.locale,
    }
    try:
        send.python({k: v for k, v in body.items() if v is not None})
    except Invalid as exc:
        return exc.errors
    return []
