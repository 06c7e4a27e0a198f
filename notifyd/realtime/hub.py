"""The real-time hub: one Redis pub/sub connection per process, fanned out to local sockets.

Every instance publishes live events on a user's channel (`Keys.user_events`); whichever
instance holds that user's sockets relays them. Subscriptions are reference-counted (one
Redis SUBSCRIBE per channel however many sockets want it), and each socket gets a bounded
queue: a client that does not read fills it and is disconnected, the daemon's memory does
not grow.

The hub is an actor: if its pub/sub connection breaks (Redis restarted), it crashes, the
supervisor restarts it, and it subscribes again to every channel still in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.realtime.history import now_ms

log = logging.getLogger("notifyd.realtime.hub")

CLOSED = b""  # put on a subscriber's queue by the hub to say "you are too slow, go"


class Subscriber:
    """One socket's view of the hub: a bounded queue of raw event payloads."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(size)
        self.overflowed = False

    def offer(self, payload: bytes) -> bool:
        if self.overflowed:
            return False
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.overflowed = True
            # make room for the sentinel so the socket's writer wakes up and closes
            self.queue.get_nowait()
            self.queue.put_nowait(CLOSED)
            return False
        return True


class Hub:
    name = "hub"

    def __init__(self, redis: Redis, keys: Keys, metrics: Metrics, *, poll: float = 1.0) -> None:
        self._poll = poll  # longest wait for a message: bounds how long stopping takes
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._subscribers: dict[str, set[Subscriber]] = defaultdict(set)
        self._pubsub: PubSub | None = None
        self._lock = asyncio.Lock()

    async def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        async with self._lock:
            first = not self._subscribers[channel]
            self._subscribers[channel].add(subscriber)
            if first and self._pubsub is not None:
                await self._pubsub.subscribe(channel)

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        async with self._lock:
            listeners = self._subscribers.get(channel)
            if listeners is None:
                return
            listeners.discard(subscriber)
            if not listeners:
                del self._subscribers[channel]
                if self._pubsub is not None:
                    await self._pubsub.unsubscribe(channel)

    async def run(self, stop: asyncio.Event) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            async with self._lock:
                # a channel of our own keeps the connection subscribed when no socket is open
                await pubsub.subscribe(self._keys.hub_heartbeat, *self._subscribers)
                self._pubsub = pubsub
            while not stop.is_set():
                message = await pubsub.get_message(timeout=self._poll)
                if message is None or message.get("type") != "message":
                    continue
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                self._deliver(name, message["data"])
        finally:
            self._pubsub = None
            close: Callable[[], Awaitable[None]] = pubsub.aclose  # redis-py leaves it untyped
            await close()

    def _deliver(self, channel: str, data: bytes) -> None:
        stamp, separator, payload = data.partition(b"|")
        if separator and stamp.isdigit():
            self._metrics.ws_fanout_latency.observe(max(0.0, (now_ms() - int(stamp)) / 1000))
        else:
            payload = data  # not framed by a feed (nothing of ours publishes that way)
        for subscriber in list(self._subscribers.get(channel, ())):
            if subscriber.offer(payload):
                self._metrics.ws_messages_out.inc()
            elif subscriber.overflowed:
                log.info("slow client disconnected", extra={"channel": channel})
