"""The promise "slow clients get a bounded send queue and are disconnected, not allowed to grow
memory" (DESIGN.md, Real time), for notification and chat sockets alike.

A socket holds events in the daemon in two places, each with its own bound:
- while it replays `?since=` and catches up, the hub queues what arrives meanwhile, at most
  `NOTIFYD_WS_SEND_QUEUE` events;
- once caught up, the hub writes frames straight to its transport, and what the client has
  not taken waits in the transport's buffer, at most `NOTIFYD_WS_SEND_BUFFER` bytes (plus the
  frames of the one read of Redis that crossed the line).
A client that stops reading while thousands of events are published must be closed with
4008 while what the daemon holds for it stays within those bounds. The tests measure what the
hub holds for the socket (`Subscriber.queued`, `Subscriber.buffered`) after every publish,
not the process's memory (noisy), and what the client was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.keys import Keys
from notifyd.realtime.roomname import dm_name
from notifyd.realtime.subscriber import Subscriber
from tests.conftest import DaemonFactory
from tests.helpers import token, wait_for

TENANT = "TEN-0001"
SLOW, FAST = "slow-reader", "fast-reader"
QUEUE = 16  # NOTIFYD_WS_SEND_QUEUE in these tests
BUFFER = 256 * 1024  # NOTIFYD_WS_SEND_BUFFER in these tests
# Enough history that its replay cannot all fit in the kernel's and the client's buffers of a
# client that does not read: the socket stays in its replay, catching up, while events come.
REPLAY_EVENTS, REPLAY_EVENT_SIZE = 64, 256 * 1024
PUBLISHED = 2000  # events published while the slow client does not read


async def slow_daemon(daemon_factory: DaemonFactory) -> Daemon:
    return await daemon_factory(
        NOTIFYD_WS_SEND_QUEUE=str(QUEUE),
        NOTIFYD_WS_SEND_BUFFER=str(BUFFER),
        NOTIFYD_WS_REPLAY_MAX_ENTRIES=str(REPLAY_EVENTS),
        NOTIFYD_WS_REPLAY_MAX_BYTES=str(2 * REPLAY_EVENTS * REPLAY_EVENT_SIZE),
    )


@dataclass
class Held:
    """The most the hub held for one socket at any of the samples."""

    queued: int = 0
    buffered: int = 0

    def sample(self, subscribers: tuple[Subscriber, ...]) -> None:
        for subscriber in subscribers:
            self.queued = max(self.queued, subscriber.queued)
            self.buffered = max(self.buffered, subscriber.buffered)


def subscribers(daemon: Daemon, channel: str) -> tuple[Subscriber, ...]:
    assert daemon.services is not None
    return daemon.services.hub.subscribers_of(channel)


async def publish_while_sampling(
    daemon: Daemon, redis: Redis, channel: str, payload: bytes, count: int
) -> Held:
    """Publishes `count` events on `channel` (as every instance's feeds do), sampling what
    the hub holds for the channel's sockets after each."""
    held = Held()
    for _ in range(count):
        await redis.publish(channel, payload)
        held.sample(subscribers(daemon, channel))
    return held


async def received_until_close(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[bytes], int]:
    """Everything the client is sent until the server's close frame, and its code."""
    frames: list[bytes] = []
    while True:
        message = await ws.receive(timeout=20)
        if message.type == aiohttp.WSMsgType.TEXT:
            frames.append(message.data.encode())
        elif message.type == aiohttp.WSMsgType.CLOSE:
            return frames, int(message.data)
        else:
            raise AssertionError(f"{message.type} before a close frame")


async def fast_reader_got(ws: aiohttp.ClientWebSocketResponse, marker: str) -> None:
    """The other socket receives the marker published last: the hub has handed on every
    event published before it (one pub/sub connection, in order) and still serves others."""
    while True:
        message = await ws.receive(timeout=20)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        if orjson.loads(message.data).get("marker") == marker:
            return


def dropped_once(daemon: Daemon) -> bool:
    """The socket's handler has ended and counted it (after the close, in its own time)."""
    return "notifyd_ws_dropped_slow_clients_total 1.0" in daemon.metrics.render().decode()


# --- the two kinds of socket ----------------------------------------------------------------

ROOM = dm_name(SLOW, FAST)  # the slow reader's chat room
OTHER_ROOM = dm_name(FAST, "someone")  # the fast reader's, another channel


@dataclass(frozen=True)
class Kind:
    """A notification feed or a chat room: where the slow and the fast reader connect, and
    the slow reader's channel and history."""

    name: str

    def url(self, daemon: Daemon, slow: bool, since: str | None = None) -> str:
        user = SLOW if slow else FAST
        if self.name == "notifications":
            path = f"/ws/notifications/{TENANT}/{user}/"
        else:
            path = f"/ws/chat/{ROOM if slow else OTHER_ROOM}/"
        url = f"ws://127.0.0.1:{daemon.port}{path}?token={token(daemon.settings, TENANT, user)}"
        return url + (f"&since={since}" if since else "")

    def channel(self, daemon: Daemon, slow: bool) -> str:
        keys = Keys(daemon.settings.redis_prefix)
        if self.name == "notifications":
            return keys.user_events(TENANT, SLOW if slow else FAST)
        return keys.room_events(TENANT, ROOM if slow else OTHER_ROOM)

    async def record(self, daemon: Daemon, event: dict[str, object]) -> None:
        """An event in the slow reader's history, for its replay."""
        assert daemon.pipeline is not None
        if self.name == "notifications":
            await daemon.pipeline.history.publish(TENANT, SLOW, event)
        else:
            await daemon.pipeline.history.publish_room(TENANT, ROOM, event)


KINDS = [
    pytest.param(Kind("notifications"), id="notifications"),
    pytest.param(Kind("chat"), id="chat"),
]


async def first_frame(ws: aiohttp.ClientWebSocketResponse) -> None:
    """The socket is served (unread count or presence): subscribed and caught up."""
    message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.TEXT, message


@pytest.mark.parametrize("kind", KINDS)
async def test_a_socket_that_stops_reading_during_its_replay_is_cut_off_at_the_queue_bound(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis: Redis, kind: Kind
) -> None:
    """While a socket replays `?since=`, live events wait in its queue: a client that stops
    reading mid-replay holds at most NOTIFYD_WS_SEND_QUEUE of them, then gets 4008."""
    daemon = await slow_daemon(daemon_factory)
    big = {"type": "notification", "message": "r" * REPLAY_EVENT_SIZE}
    for _ in range(REPLAY_EVENTS):
        await kind.record(daemon, big)
    channel = kind.channel(daemon, slow=True)
    fast = await session.ws_connect(kind.url(daemon, slow=False))
    slow = await session.ws_connect(kind.url(daemon, slow=True, since="0-0"), max_msg_size=0)
    try:
        await first_frame(fast)
        await wait_for(lambda: subscribers(daemon, channel), timeout=10)
        held = await publish_while_sampling(
            daemon, redis, channel, b'{"type":"notification","message":"live"}', PUBLISHED
        )
        await redis.publish(kind.channel(daemon, slow=False), b'{"marker":"after"}')
        await fast_reader_got(fast, "after")
        assert held.queued <= QUEUE, held
        frames, code = await received_until_close(slow)
        assert code == 4008
        live = [f for f in frames if b'"message":"live"' in f]
        assert len(live) <= QUEUE  # what came beyond the bound was never kept
    finally:
        await slow.close()
        await fast.close()
    await wait_for(lambda: dropped_once(daemon), timeout=10)


# What one read of the hub's pub/sub connection may bring, whose frames are written together
# before the buffer is checked (uvloop reads at most 256 KiB at a time).
READ_SLACK = 512 * 1024


@pytest.mark.parametrize("kind", KINDS)
async def test_a_caught_up_socket_that_stops_reading_is_cut_off_at_the_buffer_bound(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis: Redis, kind: Kind
) -> None:
    """Once caught up, frames go straight to the socket's transport: a client that stops
    reading leaves at most NOTIFYD_WS_SEND_BUFFER bytes (and one read's frames) waiting in
    the daemon, then gets 4008, while tens of MB are published for it."""
    daemon = await slow_daemon(daemon_factory)
    channel = kind.channel(daemon, slow=True)
    fast = await session.ws_connect(kind.url(daemon, slow=False))
    slow = await session.ws_connect(kind.url(daemon, slow=True), max_msg_size=0)
    try:
        await first_frame(fast)
        await first_frame(slow)
        event = orjson.dumps({"type": "notification", "message": "x" * 16_000})
        held = await publish_while_sampling(daemon, redis, channel, event, PUBLISHED)
        await redis.publish(kind.channel(daemon, slow=False), b'{"marker":"after"}')
        await fast_reader_got(fast, "after")
        assert 0 < held.buffered <= BUFFER + READ_SLACK, held
        assert held.queued == 0, held
        _, code = await received_until_close(slow)
        assert code == 4008
    finally:
        await slow.close()
        await fast.close()
    await wait_for(lambda: dropped_once(daemon), timeout=10)
