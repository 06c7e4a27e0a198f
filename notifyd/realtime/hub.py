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
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.realtime.history import now_ms
from notifyd.realtime.pubsub import OnMessage, PubSubError, Subscription
from notifyd.realtime.subscriber import Subscriber, text_frame

# opens the pub/sub connection: (on each message, after each read) → the subscription
Connect = Callable[[OnMessage, Callable[[], None]], Awaitable[Subscription]]

log = logging.getLogger("notifyd.realtime.hub")


class Hub:
    name = "hub"

    def __init__(
        self,
        connect: Connect,
        keys: Keys,
        metrics: Metrics,
        *,
        poll: float = 1.0,
        ping_every: float = 30.0,
        confirm_timeout: float = 5.0,
    ) -> None:
        """`connect` opens the pub/sub connection (`realtime.pubsub.connect` bound to the
        Redis URL). Every `ping_every` seconds the hub pings Redis; a connection that said
        nothing since the previous ping is dead (a half-open TCP connection after a network
        fault or a paused VM) and the hub crashes to reconnect."""
        self._connect = connect
        self._poll = poll  # longest wait for a stop: bounds how long stopping takes
        self._ping_every = ping_every
        self._keys = keys
        self._metrics = metrics
        # lists, not sets: most channels have one socket (a user's feed), and a list of one
        # is a quarter of a set's size, once per open connection
        self._subscribers: dict[str, list[Subscriber]] = defaultdict(list)
        self._subscription: Subscription | None = None
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self._confirm_timeout = confirm_timeout
        self._unflushed: set[Subscriber] = set()

    async def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Returns once Redis relays the channel's messages to this process, so a socket
        that replays its history next misses nothing in between. Without a connection (the
        hub reconnecting) it returns at once: the reconnect subscribes every channel in use,
        and the socket's replay covers what was published meanwhile."""
        first = not self._subscribers[channel]
        self._subscribers[channel].append(subscriber)
        subscription = self._subscription
        if subscription is None:
            return
        confirming = self._confirming.get(channel)
        if first:
            confirming = subscription.subscribe_and_confirm(channel)
            self._confirming[channel] = confirming
            confirming.add_done_callback(lambda _: self._forget_confirming(channel, confirming))
        if confirming is not None:  # else: confirmed long ago
            await self._confirmed(channel, confirming)

    def subscribers_of(self, channel: str) -> tuple[Subscriber, ...]:
        """The local sockets subscribed to `channel` (for inspection: tests, debugging)."""
        return tuple(self._subscribers.get(channel, ()))

    def _forget_confirming(self, channel: str, confirming: asyncio.Future[None]) -> None:
        if self._confirming.get(channel) is confirming:
            del self._confirming[channel]

    async def _confirmed(self, channel: str, confirming: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self._confirm_timeout):
                await asyncio.shield(confirming)  # a socket's cancel is not the channel's
        except (PubSubError, TimeoutError) as exc:
            # the connection is failing (its reconnect subscribes again) or Redis refused
            # the channel (logged by the subscription): the socket goes on either way
            log.warning(
                "subscription not confirmed", extra={"channel": channel, "error": repr(exc)}
            )

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None:
        listeners = self._subscribers.get(channel)
        if listeners is None:
            return
        if subscriber in listeners:
            listeners.remove(subscriber)
        if not listeners:
            del self._subscribers[channel]
            if self._subscription is not None:
                self._subscription.unsubscribe(channel)

    async def run(self, stop: asyncio.Event) -> None:
        subscription = await self._connect(self._on_message, self._flush)
        try:
            # A channel of our own keeps the connection subscribed when no socket is open.
            # Written in the same step as `_subscription` is set, so a socket subscribing
            # meanwhile is in this list or sends its own SUBSCRIBE, never neither.
            subscription.subscribe(self._keys.hub_heartbeat, *self._subscribers)
            self._subscription = subscription
            pinged = time.monotonic()
            while not stop.is_set():
                await asyncio.wait([subscription.lost], timeout=self._poll)
                if subscription.lost.done():
                    subscription.lost.result()  # raises why it was lost
                    return
                now = time.monotonic()
                if now - pinged >= self._ping_every:
                    if subscription.last_heard < pinged:
                        # one turn of the loop's I/O first: after a stall of the process
                        # (a paused VM) the answer may be waiting unread in the socket
                        await asyncio.wait([subscription.lost], timeout=0.05)
                    if subscription.last_heard < pinged and not subscription.lost.done():
                        raise PubSubError(
                            f"Redis did not answer a PING on the pub/sub connection in "
                            f"{self._ping_every:g} s"
                        )
                    subscription.ping()
                    pinged = now
        finally:
            self._subscription = None
            subscription.close()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        self._deliver(channel.decode(), data)

    def _deliver(self, channel: str, data: bytes) -> None:
        stamp, separator, payload = data.partition(b"|")
        if separator and stamp.isdigit():
            self._metrics.ws_fanout_latency.observe(max(0.0, (now_ms() - int(stamp)) / 1000))
        else:
            payload = data  # not framed by a feed (nothing of ours publishes that way)
        subscribers = self._subscribers.get(channel)
        if not subscribers:
            return
        frame = text_frame(payload)  # once, for every socket of this channel
        delivered = 0
        for subscriber in list(subscribers):
            if subscriber.offer(payload, frame):
                delivered += 1
                if subscriber.direct:
                    self._unflushed.add(subscriber)
            elif subscriber.overflowed:
                log.info("slow client disconnected", extra={"channel": channel})
        self._metrics.ws_messages_out.inc(delivered)

    def _flush(self) -> None:
        for subscriber in self._unflushed:
            subscriber.flush()
            if subscriber.overflowed:
                log.info("slow client disconnected")
        self._unflushed.clear()
