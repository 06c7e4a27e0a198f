"""The hub's Redis pub/sub connection: a protocol of our own, read inside its callback.

redis-py's `PubSub.get_message` costs a stack of coroutines per message (timeouts, retries,
the parser's layers, a push-handler lookup): under a chat burst, reading them that way was a
visible share of the process's CPU (docs/benchmarks.md). Here the bytes Redis sends go straight
into a hiredis reader in `data_received`, and every complete message is handed to the hub
there and then: no await and no task switch per message, and what one read brought is
written to the sockets at once (`on_read_end`).

Only what a subscriber needs: connect (TCP, TLS or a Unix socket, from the same URL and
options as notifyd's command pool: host, port, user, password, ssl_*), AUTH, SUBSCRIBE /
UNSUBSCRIBE, PING. `subscribe_and_confirm` waits for Redis's confirmation, which redis-py's
`subscribe` never did: a socket replays its history on another connection right after
subscribing, and Redis orders commands only within one connection, so without it an event
published between the replay's read and the SUBSCRIBE was neither replayed nor relayed.
A lost connection resolves `lost`; the hub then crashes and its supervisor reconnects and
subscribes again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url

log = logging.getLogger("notifyd.realtime.pubsub")

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


def _seen(future: asyncio.Future[None]) -> None:
    """Marks a failure as seen: its waiter may be gone, and asyncio would log it."""
    if not future.cancelled():
        future.exception()


def _waiter() -> asyncio.Future[None]:
    """A future for a command's answer, whether or not anyone still waits for it."""
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.add_done_callback(_seen)
    return future


class _Sent:
    """A command written and not yet fully answered: Redis answers each command of one
    connection in order, SUBSCRIBE and UNSUBSCRIBE with one reply per channel, PING with
    one, and a refused command with a single error."""

    __slots__ = ("command", "done", "replies")

    def __init__(self, command: str, replies: int, done: asyncio.Future[None] | None) -> None:
        self.command = command
        self.replies = replies
        self.done = done


class Subscription(asyncio.Protocol):
    """One connection in subscribe mode. `on_message` runs for each message as it is parsed,
    `on_read_end` once the messages of one read are all handed over."""

    def __init__(self, on_message: OnMessage, on_read_end: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_read_end = on_read_end
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._answer: asyncio.Future[object] | None = None  # the AUTH reply, while awaited
        self._sent: deque[_Sent] = deque()
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
                else:
                    self._answered(reply)
        except hiredis.ProtocolError as exc:
            self._fail(PubSubError(f"unreadable reply from Redis: {exc}"))
            return
        finally:
            if handled:
                self._on_read_end()

    def _answered(self, reply: object) -> None:
        """A confirmation, a PONG or an error: one reply to the oldest command unanswered.
        An error is logged, not fatal: it proves the connection alive, and Redis refuses
        PING while it loads its data after a restart or runs a long script (-LOADING,
        -BUSY); a SUBSCRIBE refused (an ACL) fails only its waiter, if any."""
        sent = self._sent[0] if self._sent else None
        if isinstance(reply, hiredis.ReplyError):
            command = sent.command if sent is not None else "?"
            log.warning(
                "Redis refused a pub/sub command", extra={"command": command, "error": str(reply)}
            )
            if sent is not None:
                self._sent.popleft()
                if sent.done is not None and not sent.done.done():
                    sent.done.set_exception(PubSubError(f"Redis refused {command}: {reply}"))
            return
        if sent is None:
            return
        sent.replies -= 1
        if sent.replies <= 0:
            self._sent.popleft()
            if sent.done is not None and not sent.done.done():
                sent.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = PubSubError(f"the pub/sub connection to Redis was lost ({exc or 'closed'})")
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        while self._sent:
            done = self._sent.popleft().done
            if done is not None and not done.done():
                done.set_exception(error)
        if not self.lost.done():
            self.lost.set_exception(error)

    def _fail(self, error: PubSubError) -> None:
        if not self.lost.done():
            self.lost.set_exception(error)
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows and fails every waiter

    def _send(
        self, command: str, args: tuple[str, ...], replies: int, confirm: bool = False
    ) -> asyncio.Future[None] | None:
        """Writes a command; nothing when the connection is gone (`lost` has said so, and
        the hub's reconnect subscribes to every channel in use again). With `confirm`, a
        future resolved once Redis has answered it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return None
        done = _waiter() if confirm else None
        self._sent.append(_Sent(command, replies, done))
        transport.write(pack(command, *args))
        return done

    def subscribe(self, *channels: str) -> None:
        if channels:
            self._send("SUBSCRIBE", channels, len(channels))

    def subscribe_and_confirm(self, channel: str) -> asyncio.Future[None]:
        """Subscribes; the future resolves once Redis has confirmed it (every message
        published after that is relayed), and fails with PubSubError when Redis refuses it
        or the connection is lost first."""
        done = self._send("SUBSCRIBE", (channel,), 1, confirm=True)
        if done is None:
            done = _waiter()
            done.set_exception(PubSubError("the pub/sub connection to Redis is closed"))
        return done

    def unsubscribe(self, *channels: str) -> None:
        if channels:
            self._send("UNSUBSCRIBE", channels, len(channels))

    def ping(self) -> None:
        self._send("PING", (), 1)

    async def ask(self, *args: str | bytes) -> object:
        """A command whose answer matters (AUTH), before any subscription; the caller bounds
        the wait."""
        self._answer = asyncio.get_running_loop().create_future()
        try:
            if self._transport is None or self._transport.is_closing():
                raise PubSubError("the pub/sub connection to Redis is closed")
            self._transport.write(pack(*args))
            return await self._answer
        finally:
            self._answer = None

    def close(self) -> None:
        """Drops the connection at once: nothing written but not yet sent is worth waiting
        for (a dead peer would hold a graceful close until TCP gives up)."""
        if self._transport is not None:
            self._transport.abort()
        if not self.lost.done():
            self.lost.set_result(None)
        elif not self.lost.cancelled():
            self.lost.exception()  # seen: not "Future exception was never retrieved"


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
                raise PubSubError(f"Redis refused the pub/sub connection: {answer}")
    except BaseException:
        subscription.close()  # a timeout or a refusal: not one connection left behind
        raise
    return subscription
