"""In-app delivery: the row is already in the recipient's notification center; this records
and publishes the live event every instance's real-time hub relays to the user's sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from notifyd.providers.base import Delivery, Route, Sent, TransientError

# (tenant, user, event) → the event's offset in the user's history
Publish = Callable[[str, str, dict[str, Any]], Awaitable[str]]


# [(tenant, user, event)] → their offsets, in one round trip
PublishMany = Callable[[Sequence[tuple[str, str, dict[str, Any]]]], Awaitable[list[str]]]


def _event(delivery: Delivery) -> dict[str, Any]:
    return {
        "type": "notification",
        "id": delivery.id,
        "subject": delivery.subject,
        "message": delivery.body,
        "category": delivery.category,
        "created_at": delivery.created_at.isoformat(),
    }


class InAppProvider:
    channel = "in_app"

    def __init__(self, publish: Publish, publish_many: PublishMany | None = None) -> None:
        self._publish = publish
        self._publish_many = publish_many

    @property
    def batched(self) -> bool:
        """Whether `send_many` publishes a batch in one round trip (the sender then works
        a whole stream read at a time)."""
        return self._publish_many is not None

    async def send(self, delivery: Delivery) -> Sent:
        user = delivery.user_id or delivery.recipient
        try:
            offset = await self._publish(delivery.tenant_id, user, _event(delivery))
        except RedisError as exc:
            raise TransientError(f"live event not published: {exc}") from None
        return Sent(provider_message_id=offset, provider_status="sent")

    async def send_many(self, deliveries: Sequence[Delivery]) -> list[Sent | TransientError]:
        """All or nothing: one pipelined round trip records and publishes every event."""
        assert self._publish_many is not None
        try:
            offsets = await self._publish_many(
                [(d.tenant_id, d.user_id or d.recipient, _event(d)) for d in deliveries]
            )
        except RedisError as exc:
            error = TransientError(f"live events not published: {exc}")
            return [error for _ in deliveries]
        return [Sent(provider_message_id=o, provider_status="sent") for o in offsets]

    async def route(self, tenant_id: str) -> Route | None:
        return None  # Redis is everyone's: no breaker per tenant

    async def close(self) -> None:
        return None
