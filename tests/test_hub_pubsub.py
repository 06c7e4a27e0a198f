"""The hub's own pub/sub connection against real Redis: messages, AUTH, Unix sockets, a
connection that goes silent, and a Redis restart under open sockets."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.realtime import pubsub
from notifyd.realtime.hub import Hub
from scripts.localservers import RedisServer, find_redis_server
from tests.conftest import DaemonFactory
from tests.helpers import token
from tests.test_websockets import PATH, TENANT, USER, next_json, send_in_app, url


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout}s"
        await asyncio.sleep(0.01)


class Inbox:
    """What a subscription handed over: the messages, and how many reads ended."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.reads = 0

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))

    def on_read_end(self) -> None:
        self.reads += 1


@contextlib.asynccontextmanager
async def subscribed(url: str, inbox: Inbox, *channels: str) -> AsyncIterator[pubsub.Subscription]:
    subscription = await pubsub.connect(url, inbox.on_message, inbox.on_read_end)
    try:
        subscription.subscribe(*channels)
        subscription.ping()  # answered after the SUBSCRIBE: once heard, it has taken effect
        heard = subscription.last_heard
        await until(lambda: subscription.last_heard > heard, timeout=5)
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
        await until(lambda: len(inbox.messages) == 500, timeout=5)
    assert [data.split(b"|")[0] for _, data in inbox.messages] == [
        f"m{n}".encode() for n in range(500)
    ]
    assert {channel for channel, _ in inbox.messages} == {b"hubtest:a", b"hubtest:b"}
    # many messages per read: the hub writes each socket's share of a read at once
    assert 1 <= inbox.reads < 500


async def test_unsubscribing_stops_the_messages_of_that_channel(
    redis_url: str, redis: Redis
) -> None:
    inbox = Inbox()
    async with subscribed(redis_url, inbox, "hubtest:keep", "hubtest:drop") as subscription:
        subscription.unsubscribe("hubtest:drop")
        subscription.ping()
        heard = subscription.last_heard
        await until(lambda: subscription.last_heard > heard, timeout=5)
        await redis.publish("hubtest:drop", "gone")
        await redis.publish("hubtest:keep", "kept")
        await until(lambda: inbox.messages, timeout=5)
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
            await until(lambda: inbox.messages, timeout=5)
        assert inbox.messages == [(b"hubtest:auth", b"hello")]

        wrong = redis_url.replace("redis://", "redis://hubtest:wrong@")
        with pytest.raises(pubsub.PubSubError, match="AUTH"):
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
        yield path
    finally:
        server.terminate()
        server.wait(10)


async def test_a_unix_socket_url_connects(unix_redis: Path) -> None:
    await until(unix_redis.exists, timeout=10)
    client = Redis(unix_socket_path=str(unix_redis))
    inbox = Inbox()
    try:
        async with subscribed(f"unix://{unix_redis}", inbox, "hubtest:unix"):
            await client.publish("hubtest:unix", "over a socket file")
            await until(lambda: inbox.messages, timeout=5)
    finally:
        await client.aclose()
    assert inbox.messages == [(b"hubtest:unix", b"over a socket file")]


class Relay:
    """A TCP relay in front of Redis that can go silent: bytes stop flowing both ways and
    the connection stays open, like a peer behind a dead network path."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.silent = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers += (client_w, redis_w)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not self.silent:
                    dst.write(data)

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))

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
    hub = Hub(connect, Keys("hubtest"), Metrics(), poll=0.05, ping_every=0.3)
    stop = asyncio.Event()
    running = asyncio.create_task(hub.run(stop))
    try:
        await asyncio.sleep(1.0)  # pings answered: still running
        assert not running.done()
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
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(running, timeout=2)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


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
