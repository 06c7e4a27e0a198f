"""The hub's own pub/sub connection against real Redis: messages, AUTH, Unix sockets, a
connection that goes silent, and a Redis restart under open sockets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.realtime import pubsub
from notifyd.realtime.hub import Hub, Subscriber
from scripts.localservers import RedisServer, find_redis_server
from tests.conftest import DaemonFactory
from tests.helpers import token, wait_for
from tests.test_websockets import PATH, TENANT, USER, next_json, send_in_app, url


class Inbox:
    """What a subscription handed over: the messages, and where each read ended (how many
    messages had been handed over by then)."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.read_ends: list[int] = []

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))

    def on_read_end(self) -> None:
        self.read_ends.append(len(self.messages))


@contextlib.asynccontextmanager
async def subscribed(url: str, inbox: Inbox, *channels: str) -> AsyncIterator[pubsub.Subscription]:
    subscription = await pubsub.connect(url, inbox.on_message, inbox.on_read_end)
    try:
        subscription.subscribe(*channels)
        subscription.ping()  # answered after the SUBSCRIBE: once heard, it has taken effect
        heard = subscription.last_heard
        await wait_for(lambda: subscription.last_heard > heard, timeout=5)
        yield subscription
    finally:
        subscription.close()


async def test_published_messages_arrive_in_order_and_each_read_ends_with_one_call(
    redis_url: str, redis: Redis
) -> None:
    inbox = Inbox()
    async with subscribed(redis_url, inbox, "hubtest:a", "hubtest:b"):
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(500):
                pipe.publish("hubtest:a" if n % 2 else "hubtest:b", f"m{n}|" + "x" * 200)
            await pipe.execute()
        await wait_for(lambda: len(inbox.messages) == 500, timeout=5)
    assert [data.split(b"|")[0] for _, data in inbox.messages] == [
        f"m{n}".encode() for n in range(500)
    ]
    assert {channel for channel, _ in inbox.messages} == {b"hubtest:a", b"hubtest:b"}
    # one call per read, after its messages: never a call with no new message before it,
    # and the last message is followed by one (the hub writes a read's frames at once)
    ends = inbox.read_ends
    assert ends == sorted(set(ends)) and ends[0] > 0 and ends[-1] == 500, ends
    # many messages per read (500 published in one pipeline), not a call per message
    assert len(ends) < 500


async def test_each_read_hands_over_its_whole_messages_then_ends_with_one_call() -> None:
    """Fed as a transport feeds it: `on_read_end` runs once per read that completed
    messages, after all of them; a read that completes none calls nothing."""
    inbox = Inbox()
    subscription = pubsub.Subscription(inbox.on_message, inbox.on_read_end)

    def message(n: int) -> bytes:
        return pubsub.pack("message", "hubtest:c", f"m{n}")

    try:
        subscription.data_received(message(0) + message(1) + message(2) + message(3)[:7])
        assert [data for _, data in inbox.messages] == [b"m0", b"m1", b"m2"]
        assert inbox.read_ends == [3]
        subscription.data_received(message(3)[7:])
        assert inbox.read_ends == [3, 4]
        subscription.data_received(message(4)[:5])  # no whole message: no call
        assert inbox.read_ends == [3, 4]
    finally:
        subscription.close()


async def test_unsubscribing_stops_the_messages_of_that_channel(
    redis_url: str, redis: Redis
) -> None:
    inbox = Inbox()
    async with subscribed(redis_url, inbox, "hubtest:keep", "hubtest:drop") as subscription:
        subscription.unsubscribe("hubtest:drop")
        subscription.ping()
        heard = subscription.last_heard
        await wait_for(lambda: subscription.last_heard > heard, timeout=5)
        await redis.publish("hubtest:drop", "gone")
        await redis.publish("hubtest:keep", "kept")
        await wait_for(lambda: inbox.messages, timeout=5)
    assert inbox.messages == [(b"hubtest:keep", b"kept")]


async def test_an_acl_user_authenticates_and_a_wrong_password_is_refused(
    redis_url: str, redis: Redis
) -> None:
    await redis.execute_command("ACL", "SETUSER", "hubtest", "on", ">s3cret", "&*", "+@all")
    try:
        authenticated = redis_url.replace("redis://", "redis://hubtest:s3cret@")
        inbox = Inbox()
        async with subscribed(authenticated, inbox, "hubtest:auth"):
            await redis.publish("hubtest:auth", "hello")
            await wait_for(lambda: inbox.messages, timeout=5)
        assert inbox.messages == [(b"hubtest:auth", b"hello")]

        wrong = redis_url.replace("redis://", "redis://hubtest:wrong@")
        with pytest.raises(pubsub.PubSubError, match="refused"):
            await pubsub.connect(wrong, inbox.on_message, inbox.on_read_end)
    finally:
        await redis.execute_command("ACL", "DELUSER", "hubtest")


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "redis.sock"
    server = subprocess.Popen(
        [str(find_redis_server()), "--port", "0", "--unixsocket", str(path), "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not path.exists():
            assert server.poll() is None, f"redis-server exited with {server.returncode}"
            assert time.monotonic() < deadline, "redis-server made no socket in 10 s"
            time.sleep(0.02)
        yield path
    finally:
        server.terminate()
        server.wait(10)


async def test_a_unix_socket_url_connects(unix_redis: Path) -> None:
    await wait_for(unix_redis.exists, timeout=10)  # redis-server made it: it is up
    client = Redis(unix_socket_path=str(unix_redis))
    inbox = Inbox()
    try:
        async with subscribed(f"unix://{unix_redis}", inbox, "hubtest:unix"):
            await client.publish("hubtest:unix", "over a socket file")
            await wait_for(lambda: inbox.messages, timeout=5)
    finally:
        await client.aclose()
    assert inbox.messages == [(b"hubtest:unix", b"over a socket file")]


class Relay:
    """A TCP relay in front of Redis that can go silent: bytes stop flowing both ways and
    the connection stays open, like a peer behind a dead network path."""

    def __init__(self, port: int, *, delay: float = 0.0) -> None:
        self._port = port
        self._delay = delay  # on the way to Redis only
        self.silent = False
        self.pongs = 0  # PING answers relayed back from Redis
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += (client_w, redis_w)

        async def pipe(
            src: asyncio.StreamReader,
            dst: asyncio.StreamWriter,
            delay: float = 0.0,
            from_redis: bool = False,
        ) -> None:
            while data := await src.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                if not self.silent:
                    dst.write(data)
                    if from_redis:  # in subscribe mode Redis answers PING with ["pong", ""]
                        self.pongs += data.count(b"$4\r\npong\r\n")

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(
                pipe(client_r, redis_w, self._delay), pipe(redis_r, client_w, from_redis=True)
            )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_connection_that_goes_silent_fails_the_hub_at_the_next_ping(
    redis_url: str, redis_server: RedisServer
) -> None:
    relay = Relay(redis_server.port)
    port = await relay.start()
    connect = functools.partial(pubsub.connect, f"redis://127.0.0.1:{port}/0")
    hub = Hub(connect, Keys("hubtest"), Metrics(), poll=0.05, ping_every=0.5)
    stop = asyncio.Event()
    running = asyncio.create_task(hub.run(stop))
    try:
        await wait_for(lambda: relay.pongs >= 2 or running.done(), timeout=10)
        assert not running.done()  # its pings answered, the hub runs on
        relay.silent = True
        with pytest.raises(pubsub.PubSubError, match="did not answer a PING"):
            await asyncio.wait_for(running, timeout=5)
    finally:
        stop.set()
        if not running.done():
            running.cancel()
        await relay.close()


async def test_a_hub_stops_promptly_when_asked(redis_url: str) -> None:
    connect = functools.partial(pubsub.connect, redis_url)
    hub = Hub(connect, Keys("hubtest"), Metrics(), poll=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(hub.run(stop))
    await wait_for(lambda: hub._subscription is not None or running.done(), timeout=5)
    assert not running.done()
    stop.set()
    await asyncio.wait_for(running, timeout=2)


async def test_after_a_redis_restart_an_open_socket_gets_live_events_again(
    daemon_factory: DaemonFactory, own_redis: RedisServer
) -> None:
    """The hub's connection dies with Redis; its supervisor reconnects it and subscribes
    again to every channel an open socket still wants, without the socket reconnecting."""
    daemon = await daemon_factory(REDIS_URL=own_redis.url(0))
    bearer = token(daemon.settings, TENANT, USER)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                url(daemon, PATH), headers={"Authorization": f"Bearer {bearer}"}
            ) as ws,
        ):
            assert (await next_json(ws))["type"] == "unread_count"
            first = await send_in_app(daemon, "before the restart")
            assert (await next_json(ws))["id"] == first

            await asyncio.to_thread(own_redis.restart)
            # sends until one arrives live: the hub may still be reconnecting at first
            seen: set[str] = set()
            sent: list[str] = []
            async with asyncio.timeout(30):
                while not seen & set(sent):
                    sent.append(await send_in_app(daemon, "after the restart"))
                    with contextlib.suppress(TimeoutError):
                        while True:
                            event = await next_json(ws, timeout=1)
                            if event.get("type") == "notification":
                                seen.add(event["id"])
            assert not ws.closed
    finally:
        await daemon.stop()


async def test_a_confirmed_subscription_misses_nothing_published_after_it(
    redis_server: RedisServer, redis: Redis
) -> None:
    """Redis orders commands only within one connection. Through a relay that holds our
    commands back, an unconfirmed SUBSCRIBE is still on its way when a publish on another
    connection lands; a confirmed one has taken effect when the future resolves."""
    relay = Relay(redis_server.port, delay=0.3)
    port = await relay.start()
    inbox = Inbox()
    subscription = await pubsub.connect(
        f"redis://127.0.0.1:{port}/0", inbox.on_message, inbox.on_read_end
    )
    try:
        await subscription.subscribe_and_confirm("hubtest:ordered")
        await redis.publish("hubtest:ordered", "right after")
        await wait_for(lambda: inbox.messages, timeout=5)
        assert inbox.messages == [(b"hubtest:ordered", b"right after")]

        subscription.subscribe("hubtest:unconfirmed")  # what redis-py's subscribe does
        assert await redis.publish("hubtest:unconfirmed", "too early") == 0
    finally:
        subscription.close()
        await relay.close()


async def test_a_refused_channel_fails_its_waiter_and_the_connection_lives_on(
    redis_url: str, redis: Redis
) -> None:
    """An error reply (an ACL refusing one channel; -LOADING or -BUSY for a PING) proves the
    connection alive: it fails only the command it answers."""
    await redis.execute_command(
        "ACL", "SETUSER", "hubacl", "on", ">pw", "resetchannels", "&hubtest:allowed", "+@all"
    )
    inbox = Inbox()
    url = redis_url.replace("redis://", "redis://hubacl:pw@")
    subscription = await pubsub.connect(url, inbox.on_message, inbox.on_read_end)
    try:
        with pytest.raises(pubsub.PubSubError, match="NOPERM"):
            await asyncio.wait_for(subscription.subscribe_and_confirm("hubtest:denied"), 5)
        await asyncio.wait_for(subscription.subscribe_and_confirm("hubtest:allowed"), 5)
        await redis.publish("hubtest:allowed", "still here")
        await wait_for(lambda: inbox.messages, timeout=5)
        assert inbox.messages == [(b"hubtest:allowed", b"still here")]
        assert not subscription.lost.done()
    finally:
        subscription.close()
        await redis.execute_command("ACL", "DELUSER", "hubacl")


async def test_hub_subscribe_returns_once_redis_relays_the_channel(
    redis_server: RedisServer, redis: Redis
) -> None:
    """A socket replays its history right after `Hub.subscribe`: by then every event
    published is on its way to it, even with our commands slowed down in transit."""
    relay = Relay(redis_server.port, delay=0.3)
    port = await relay.start()
    connect = functools.partial(pubsub.connect, f"redis://127.0.0.1:{port}/0")
    hub = Hub(connect, Keys("hubtest"), Metrics(), poll=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(hub.run(stop))
    try:
        await wait_for(lambda: hub._subscription is not None, timeout=5)
        first, second = Subscriber(10), Subscriber(10)
        await asyncio.gather(
            hub.subscribe("hubtest:replayed", first), hub.subscribe("hubtest:replayed", second)
        )
        await redis.publish("hubtest:replayed", "published after subscribe")
        await wait_for(lambda: first.take_queued() == b"published after subscribe", timeout=5)
        await wait_for(lambda: second.take_queued() == b"published after subscribe", timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=5)
        await relay.close()
