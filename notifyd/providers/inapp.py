"""In-app delivery: the row is already in the recipient's notification center; this publishes
the live event every instance's real-time hub relays to the user's open sockets."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd.keys import Keys
from notifyd.payloads import dumps
from notifyd.providers.base import Delivery, Sent, TransientError


class InAppProvider:
    channel = "in_app"

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def send(self, delivery: Delivery) -> Sent:
        event = {
            "type": "notification",
            "id": delivery.id,
            "subject": delivery.subject,
            "message": delivery.body,
            "category": delivery.category,
            "created_at": delivery.created_at,
        }
        user = delivery.user_id or delivery.recipient
        try:
            await self._redis.publish(
                self._keys.user_events(delivery.tenant_id, user), dumps(event)
            )
        except RedisError as exc:
            raise TransientError(f"live event not published: {exc}") from None
        return Sent(provider_status="sent")

    async def close(self) -> None:
        return None
