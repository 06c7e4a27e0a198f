"""In-app delivery: the row is already in the recipient's notification center; this records
and publishes the live event every instance's real-time hub relays to the user's sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from notifyd.providers.base import Delivery, Sent, TransientError

# (tenant, user, event) → the event's offset in the user's history
Publish = Callable[[str, str, dict[str, Any]], Awaitable[str]]


class InAppProvider:
    channel = "in_app"

    def __init__(self, publish: Publish) -> None:
        self._publish = publish

    async def send(self, delivery: Delivery) -> Sent:
        event = {
            "type": "notification",
            "id": delivery.id,
            "subject": delivery.subject,
            "message": delivery.body,
            "category": delivery.category,
            "created_at": delivery.created_at.isoformat(),
        }
        user = delivery.user_id or delivery.recipient
        try:
            offset = await self._publish(delivery.tenant_id, user, event)
        except RedisError as exc:
            raise TransientError(f"live event not published: {exc}") from None
        return Sent(provider_message_id=offset, provider_status="sent")

    async def close(self) -> None:
        return None
