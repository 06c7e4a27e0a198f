"""The hub's Redis pub/sub connection: a protocol of our own, read inside its callback.

redis-py's `PubSub.get_message` costs a stack of coroutines per message (timeouts, retries,
the parser's layers, a push-handler lookup): in the ws_fanout burst, 10,000 chat events a
second, reading them that way was 8 % of the process. Here the bytes Redis sends go straight
into a hiredis reader in `data_received`, and every complete message is handed to the hub
there and then: no await and no task switch per message, and what one read brought is
written to the sockets at once (`on_read_end`).

Only what a subscriber needs: connect (TCP, TLS or a Unix socket, from the same URL as the
rest of notifyd), AUTH, SUBSCRIBE / UNSUBSCRIBE, PING. Subscribing does not wait for Redis's
confirmation, exactly like redis-py's `subscribe`: a socket that must not miss an event
replays its history after subscribing. A lost connection resolves `lost`; the hub then
crashes and its supervisor reconnects and subscribes again.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

# (channel, data) of one published message
OnMessage = Callable[[bytes, bytes], None]


class PubSubError(ConnectionError):
    """Redis refused us (AUTH) or went away."""


def pack(*args: str | bytes) -> bytes:
    """One command in RESP, the form Redis reads."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class Subscription(asyncio.Protocol):
    """One connection in subscribe mode. `on_message` runs for each message as it is parsed,
    `on_read_end` once the messages of one read are all handed over."""

    def __init__(self, on_message: OnMessage, on_read_end: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_read_end = on_read_end
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[object] | None = None  # the AUTH reply, while awaited
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.last_heard = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self._reader.feed(data)
        handled = False
        try:
            while (reply := self._reader.gets()) is not False:
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    self._on_message(reply[1], reply[2])
                    handled = True
                elif self._answer is not None and not self._answer.done():
                    self._answer.set_result(reply)
                elif isinstance(reply, hiredis.ReplyError):
                    self._fail(PubSubError(f"Redis answered the subscription with {reply}"))
                    return
                # anything else: subscribe/unsubscribe confirmations, PONG
        except hiredis.ProtocolError as exc:
            self._fail(PubSubError(f"unreadable reply from Redis: {exc}"))
            return
        finally:
            if handled:
                self._on_read_end()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = PubSubError(f"the pub/sub connection to Redis was lost ({exc or 'closed'})")
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        if not self.lost.done():
            self.lost.set_exception(error)

    def _fail(self, error: PubSubError) -> None:
        if not self.lost.done():
            self.lost.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def send(self, *args: str | bytes) -> None:
        """Writes a command; nothing when the connection is gone: `lost` has said so, and
        the hub's reconnect subscribes to every channel in use again."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(pack(*args))

    def subscribe(self, *channels: str) -> None:
        if channels:
            self.send("SUBSCRIBE", *channels)

    def unsubscribe(self, *channels: str) -> None:
        if channels:
            self.send("UNSUBSCRIBE", *channels)

    def ping(self) -> None:
        self.send("PING")

    async def ask(self, *args: str | bytes) -> object:
        """A command whose answer matters (AUTH), before any subscription; the caller bounds
        the wait."""
        self._answer = asyncio.get_running_loop().create_future()
        try:
            self.send(*args)
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self.lost.done():
            self.lost.set_result(None)


async def connect(
    url: str,
    on_message: OnMessage,
    on_read_end: Callable[[], None],
    *,
    connect_timeout: float = 5.0,
) -> Subscription:
    """A subscription connection to the Redis of `url` (redis://, rediss://, unix://, with
    the same user, password and TLS options the command pool takes from it)."""
    options: dict[str, Any] = dict(parse_url(url))
    kind = options.pop("connection_class", None)
    async with asyncio.timeout(connect_timeout):
        return await _open(options, kind, on_message, on_read_end)


async def _open(
    options: dict[str, Any], kind: object, on_message: OnMessage, on_read_end: Callable[[], None]
) -> Subscription:
    loop = asyncio.get_running_loop()

    def protocol() -> Subscription:
        return Subscription(on_message, on_read_end)

    if kind is UnixDomainSocketConnection:
        transport, subscription = await loop.create_unix_connection(protocol, options["path"])
    else:
        host, port = options.get("host", "localhost"), int(options.get("port", 6379))
        tls: ssl.SSLContext | None = None
        if kind is SSLConnection:
            # redis-py reads the ssl_* query options; the context is built the same way
            # (only its ssl_* options: the rest of the URL's query is for the command pool)
            tls_options = {k: v for k, v in options.items() if k.startswith("ssl_")}
            tls = SSLConnection(host=host, port=port, **tls_options).ssl_context.get()
        transport, subscription = await loop.create_connection(
            protocol, host, port, ssl=tls, server_hostname=host if tls else None
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        password = options.get("password")
        if password:
            username = options.get("username")
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            answer = await subscription.ask(*auth)
            if isinstance(answer, hiredis.ReplyError):
                raise PubSubError(f"Redis refused the pub/sub connection's AUTH: {answer}")
    except BaseException:
        subscription.close()  # a timeout or a refusal: not one connection left behind
        raise
    return subscription
