"""What every WebSocket endpoint shares: the handshake, authentication, replay, the writer.

The token comes from `Authorization: Bearer …`, from `Sec-WebSocket-Protocol: bearer,
<token>` (browsers cannot set headers on a WebSocket), or from `?token=`. The socket is
accepted first and then closed with a code and reason when something is wrong, because a
browser never shows the body of a refused handshake:

- 4001 the token is missing, invalid or expired; or it expired while the socket was open
  (reason "token expired"), or a `refresh` frame named another identity
- 4003 the path names a channel or room that is not the caller's
- 4004 no such room in the caller's tenant
- 4008 the client did not read fast enough (its bounded queue overflowed)
- 4029 the user or tenant has its most sockets open (`notifyd.http.limits`)
- 1001 the server is shutting down (reconnect, possibly elsewhere)

A socket lives as long as its token: at the token's `exp` plus JWT_LEEWAY it is closed with
4001 "token expired", unless the client sent `{"type": "refresh", "token": "<jwt>"}` with a
fresh token of the same identity first (answered `{"type": "refreshed", "expires_at",
"expires_in"}`). NOTIFYD_WS_TOKEN_WARNING seconds before the close the server sends
`{"type": "token_expiring", "expires_in": s}`, so a client knows to refresh.

An `Origin` header must be in `NOTIFYD_ALLOWED_ORIGINS` (alias `NOTIFYD_WS_ALLOWED_ORIGINS`;
or, when that is empty, name the same host as the request); clients that send none (servers,
CLIs) are not browsers and pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import Counter

from notifyd.auth.identity import Identity
from notifyd.auth.tokens import TokenError, TokenVerifier
from notifyd.http.context import services
from notifyd.payloads import dumps
from notifyd.realtime.history import Missed, after, is_offset
from notifyd.realtime.ports import Seat
from notifyd.realtime.subscriber import Subscriber

log = logging.getLogger("notifyd.http.websockets")

_OFFSET_PREFIX = b'{"offset":"'
UNAUTHORIZED = 4001
FORBIDDEN = 4003
NOT_FOUND = 4004
TOO_SLOW = 4008
EXPIRED = (UNAUTHORIZED, b"token expired")
REFRESH = "refresh"  # the frame type every socket understands, besides its own
REFUSED = "refresh_refused"  # the error code of a refresh that changed nothing


class OpenSockets:
    """The sockets this instance holds, to close them with "going away" on shutdown."""

    def __init__(self) -> None:
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
        # closes the hub or a token's deadline asked for, `token_expiring` frames
        self.closing: set[asyncio.Task[Any]] = set()
        self.deadlines = TokenClock()  # every socket's token moments, one timer


SOCKETS = web.AppKey("websockets", OpenSockets)


def token_of(request: web.Request) -> tuple[str | None, str | None]:
    """(token, the subprotocol to answer with when it came that way)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0].lower() == "bearer" and offered[1]:
        return offered[1], offered[0]
    if "token=" not in request.query_string:
        return None, None  # (not parsing the query keeps a long-lived request smaller)
    query = request.query.get("token")
    return (query or None), None


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if allowed:
        return "*" in allowed or origin in allowed
    return urlsplit(origin).netloc == request.host


class TokenOwner(Protocol):
    """What a socket's token tells when its moments come (the socket's `live`)."""

    def token_expired(self) -> None: ...

    def token_expiring(self, seconds_left: float) -> None: ...


class TokenClock:
    """Every open socket's next token moment (its warning, or its deadline), served by one
    timer for the whole process.

    A timer of its own per socket (a `TimerHandle`, under uvloop a libuv timer too) was a
    measurable share of an idle connection's memory (docs/benchmarks.md, `connections`);
    here a socket costs one entry in a set. Moments are kept in buckets of whole seconds of the
    wall clock (a token's `exp` is whole seconds): a socket is warned and closed at most a
    second after its moment, never before it. The buckets' seconds are a heap, and the one
    timer sleeps until the earliest of them."""

    def __init__(self) -> None:
        self._buckets: dict[int, set[SocketToken]] = {}
        self._seconds: list[int] = []  # a heap of the buckets' seconds (an emptied one stays)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_second: int | None = None

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def schedule(self, token: SocketToken, at: float) -> int:
        """`token.due()` is called at `at` (rounded up to its second); returns that second,
        which the token gives back to `cancel`."""
        second = math.ceil(at)
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._seconds, second)
            if self._timer_second is None or second < self._timer_second:
                self._arm(second)
        bucket.add(token)
        return second

    def cancel(self, token: SocketToken, second: int) -> None:
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(token)
            if not bucket:
                del self._buckets[second]

    def close(self) -> None:
        """The app is done: no timer is left on the loop."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_second = None
        self._buckets.clear()
        self._seconds.clear()

    def _arm(self, second: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, second - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_second = second

    def _fire(self) -> None:
        self._timer = self._timer_second = None
        now = time.time()
        while self._seconds and self._seconds[0] <= now:
            bucket = self._buckets.pop(heapq.heappop(self._seconds), None)
            for token in bucket or ():
                token.due()  # may schedule it again, into a later bucket
        while self._seconds and self._seconds[0] not in self._buckets:
            heapq.heappop(self._seconds)  # emptied by cancels meanwhile
        if self._seconds:
            self._arm(self._seconds[0])


class SocketToken:
    """Who a socket is for and until when: its token's identity, the moment the token stops
    being accepted (`exp` plus JWT_LEEWAY), and its next moment on the process's
    `TokenClock`.

    One moment per socket at a time (no task, no polling, no timer of its own): first the
    warning (`warn_before` ahead of the deadline, or halfway there for a token that lives
    less than twice that), then the close. A refresh moves the deadline and re-arms it.
    Nothing here runs per frame: the hub's writes and the client's frames never look at the
    token."""

    __slots__ = (
        "_clock",
        "_owner",
        "_second",
        "_warn_before",
        "_warned",
        "expires_at",
        "identity",
    )

    def __init__(
        self, identity: Identity, expires_at: float, warn_before: float, clock: TokenClock
    ) -> None:
        self.identity = identity
        self.expires_at = expires_at
        self._warn_before = warn_before
        self._warned = False
        self._clock = clock
        self._second: int | None = None
        self._owner: TokenOwner | None = None

    def start(self, owner: TokenOwner) -> None:
        """Arms it: `owner.token_expiring(seconds left)` before the deadline,
        `owner.token_expired()` at it (one reference to the owner, not two bound methods:
        this lives as long as its socket)."""
        self._owner = owner
        self._arm()

    def stop(self) -> None:
        """The socket is done: its moment and its owner (which holds the socket) go."""
        if self._second is not None:
            self._clock.cancel(self, self._second)
            self._second = None
        self._owner = None

    def renew(self, expires_at: float) -> None:
        """A fresh token of the same identity: the deadline follows it (earlier or later)."""
        self.expires_at = expires_at
        self._warned = False
        if self._owner is not None:
            self._arm()

    def _arm(self) -> None:
        if self._second is not None:
            self._clock.cancel(self, self._second)
        left = self.expires_at - time.time()
        lead = min(self._warn_before, left / 2)
        at = self.expires_at - lead if not self._warned and lead > 0 else self.expires_at
        self._second = self._clock.schedule(self, at)

    def due(self) -> None:
        """Called by the clock at this socket's moment: the deadline passed (close), or the
        warning is due (tell the client, then wait for the deadline), or the wall clock was
        set back meanwhile (wait again)."""
        self._second = None
        owner = self._owner
        if owner is None:
            return  # stopped meanwhile
        now = time.time()
        if now >= self.expires_at:
            owner.token_expired()
            return
        if not self._warned and self._warn_before > 0:
            self._warned = True
            owner.token_expiring(max(0.0, self.expires_at - now))
        self._arm()


async def accept(request: web.Request) -> tuple[web.WebSocketResponse, SocketToken | None]:
    """Checks the Origin, completes the handshake and verifies the token; with no token the
    socket is already closed with the reason."""
    s = services(request).settings
    if not origin_allowed(request, s.allowed_origins):
        raise web.HTTPForbidden(text="origin not allowed")
    token, protocol = token_of(request)
    ws = web.WebSocketResponse(
        heartbeat=s.ws_heartbeat,
        max_msg_size=s.ws_max_frame,
        protocols=(protocol,) if protocol else (),
        compress=False,  # frames are small JSON, and the hub writes ready-made frames
    )
    await ws.prepare(request)
    if token is None:
        return await refuse(request, ws, UNAUTHORIZED, b"send a bearer token"), None
    try:
        identity, expires_at = await services(request).verifier.verify_until(token)
    except TokenError as exc:
        return await refuse(request, ws, UNAUTHORIZED, exc.reason.encode()[:120]), None
    # No tenant_id_var.set here: a second context variable in every socket's task costs
    # more than a tenant id in the socket's few log lines (`live` names it in each), and
    # the token clock's callbacks run in whichever socket's context armed its timer.
    clock = request.app[SOCKETS].deadlines
    return ws, SocketToken(identity, expires_at, s.ws_token_warning, clock)


async def refuse(
    request: web.Request, ws: web.WebSocketResponse, code: int, reason: bytes
) -> web.WebSocketResponse:
    """Close a socket that will not be served, with the reason, leaving no cycle behind
    (the callback goes first: the client's close frame would otherwise arm a new heartbeat
    timer that keeps the socket for another interval)."""
    _drop_heartbeat_callback(request)
    await ws.close(code=code, message=reason)
    return ws


class live:
    """Subscribed to `channel` for the socket's lifetime, counted, closed on shutdown or
    when its token expires.

    A class with slots rather than an async generator: one of these lives as long as each
    socket, so its size counts once per open connection."""

    __slots__ = (
        "_channel",
        "_connections",
        "_endpoint",
        "_opened",
        "_request",
        "_seat",
        "_subscriber",
        "_token",
        "_ws",
    )

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        token: SocketToken,
        channel: str,
        endpoint: str,
        seat: Seat,
    ) -> None:
        self._request = request
        self._ws = ws
        self._token = token
        self._seat = seat  # given back when the socket is done (one `async with`, not two)
        self._channel = channel
        self._endpoint = endpoint
        self._connections = services(request).metrics.ws_connections.labels(endpoint)
        self._subscriber: Subscriber | None = None
        self._opened = time.monotonic()

    async def __aenter__(self) -> Subscriber:
        ctx = services(self._request)
        self._request.app[SOCKETS].sockets.add(self._ws)
        subscriber = Subscriber(ctx.settings.ws_send_queue, ctx.settings.ws_send_buffer, self._end)
        try:
            await ctx.hub.subscribe(self._channel, subscriber)
        except BaseException:
            ctx.seats.release_soon(self._seat)  # no __aexit__ follows a failed __aenter__
            raise
        # from here on __aexit__ runs and stops the timer (a failed subscribe leaves none)
        self._token.start(self)
        self._subscriber = subscriber
        self._connections.inc()
        log.info("websocket opened", extra=self._log_fields())
        return subscriber

    def _log_fields(self, **more: Any) -> dict[str, Any]:
        return {"tenant_id": self._token.identity.tenant_id, "endpoint": self._endpoint, **more}

    def _end(self, code: int, reason: bytes) -> None:
        """Called by the hub (which awaits nothing): the close runs as a task of its own."""
        self._later(self._ws.close(code=code, message=reason))

    def token_expired(self) -> None:
        """Called by the token's timer: the token expired and no refresh came."""
        log.info("websocket token expired", extra=self._log_fields())
        self._end(*EXPIRED)

    def token_expiring(self, seconds_left: float) -> None:
        """Called by the token's timer: tells the client to refresh while it can."""
        frame = dumps({"type": "token_expiring", "expires_in": round(seconds_left, 1)})
        self._later(_send_if_open(self._ws, frame.decode()))

    def _later(self, step: Coroutine[Any, Any, Any]) -> None:
        closing = self._request.app[SOCKETS].closing
        task = asyncio.get_running_loop().create_task(step)
        closing.add(task)
        task.add_done_callback(closing.discard)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> bool:
        """Unsubscribes and gives the seat back. A client gone while a frame was written
        to it (aiohttp's "Cannot write to closing transport") ends the socket as a close
        does: suppressed here, not a handler error with a traceback in the log per
        client that connects and leaves."""
        ctx = services(self._request)
        subscriber = self._subscriber
        assert subscriber is not None
        self._token.stop()
        try:
            await ctx.hub.unsubscribe(self._channel, subscriber)
        finally:  # counted and freed even when Redis fails the unsubscribe
            self._subscriber = None  # it holds our `_end`: no cycle left behind
            _drop_heartbeat_callback(self._request)
            self._connections.dec()
            ctx.seats.release_soon(self._seat)
        if subscriber.overflowed:
            ctx.metrics.ws_dropped.inc()
        log.info(
            "websocket closed",
            extra=self._log_fields(
                code=self._ws.close_code, seconds=round(time.monotonic() - self._opened, 1)
            ),
        )
        return isinstance(exc, ConnectionResetError)


async def _send_if_open(ws: web.WebSocketResponse, text: str) -> None:
    if ws.closed:
        return
    with contextlib.suppress(ConnectionError):  # gone meanwhile: its handler sees the close
        await ws.send_str(text)


def _drop_heartbeat_callback(request: web.Request) -> None:
    """aiohttp leaves the response's heartbeat callback (a bound method) on the connection's
    protocol after the socket is done: a reference cycle through the request, so a closed
    socket's objects waited for a full collection, and with many sockets open each full
    collection held the loop for a long pause (docs/benchmarks.md). Without the
    callback, reference counting frees a closed socket at once. A private attribute of
    aiohttp; `tests/test_websockets.py` notices if an upgrade makes this a no-op. Only for a
    socket that is done: aiohttp notices pongs through this callback, so a live socket
    without it would be closed at its next heartbeat."""
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None


async def replay(
    ws: web.WebSocketResponse,
    request: web.Request,
    missed_since: Callable[[str], Awaitable[Missed]],
    refetch: str,
) -> str | None:
    """With `?since=<offset>`: what the client missed, in order (or a `gap` frame naming
    `refetch` when some of it is no longer kept, or is more than one replay carries: the
    replay then holds the newest events); returns the last offset sent.

    Call it after subscribing: nothing falls between the two, and the writer skips live
    events the replay already sent."""
    if "since=" not in request.query_string:
        return None
    since = request.query.get("since")
    if not since:
        return None
    if not is_offset(since):
        await ws.send_str(error_frame("since must be an offset taken from an earlier event"))
        return None
    missed = await missed_since(since)
    if missed.gap:
        # expired, trimmed, or more than one replay carries (its bounds): what lies between
        # `since` and `until` (the first event replayed, if any) is for REST
        detail = f"some events after this offset are not replayed; refetch {refetch}"
        gap = {"type": "gap", "since": since, "until": missed.until, "detail": detail}
        await ws.send_str(dumps(gap).decode())
    last = None
    for offset, payload in missed.events:
        await ws.send_frame(payload, WSMsgType.TEXT)
        last = offset
    return last


def _offset_of(payload: bytes) -> str | None:
    if not payload.startswith(_OFFSET_PREFIX):
        return None
    end = payload.find(b'"', len(_OFFSET_PREFIX))
    return payload[len(_OFFSET_PREFIX) : end].decode() if end > 0 else None


async def catch_up(
    ws: web.WebSocketResponse,
    request: web.Request,
    subscriber: Subscriber,
    replayed_to: str | None,
    ends_with: Callable[[bytes], bool] | None = None,
) -> bool:
    """Sends, in order, what the hub queued while the replay ran (skipping what the replay
    already sent), then hands the socket to the hub's direct path. False when the socket
    is closing instead (too slow, or an event such as "removed from the room" ended it)."""
    while True:
        payload = subscriber.take_queued()
        if payload is None:
            break
        if ends_with is not None and ends_with(payload):
            await ws.close(code=FORBIDDEN, message=b"no longer a member of this room")
            return False
        if replayed_to is not None:
            offset = _offset_of(payload)
            if offset is not None and not after(offset, replayed_to):
                continue  # already sent by the replay
        await ws.send_frame(payload, WSMsgType.TEXT)
    if subscriber.overflowed or ws.closed:
        return False
    transport = request.transport
    if transport is None:
        return False
    # nothing awaited since the queue was seen empty: the order of events is kept
    subscriber.go_direct(transport, ws, ends_with)
    return True


@functools.cache
def _with_refresh(known: tuple[str, ...]) -> tuple[str, ...]:
    """An endpoint's frame types and `refresh`: one tuple per endpoint, not one per socket."""
    return (*known, REFRESH)


async def commands(
    ws: web.WebSocketResponse,
    request: web.Request,
    endpoint: str,
    known: tuple[str, ...],
    token: SocketToken,
    default: str | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The client's frames as (type, JSON object), until the socket closes: over the rate
    limit, not JSON objects, or of an unknown type, they are answered with an error frame
    here and never reach the endpoint; `refresh` frames are handled here for every socket.
    `default` is the type of a frame that names none."""
    ctx = services(request)
    known = _with_refresh(known)
    limit: RateLimit | None = None  # made at the first frame: idle sockets never need one
    counted = ctx.metrics.ws_messages_in
    counters: dict[str, Counter] = {}  # labels() validates and locks on each call: once per type
    async for frame in ws:
        if frame.type != WSMsgType.TEXT:
            continue
        if limit is None:
            limit = RateLimit(ctx.settings.ws_message_rate, ctx.settings.ws_message_burst)
        if not limit.allow():
            ctx.metrics.ws_rate_limited.inc()
            await ws.send_str(error_frame("too many frames; slow down", code="rate_limited"))
            continue
        try:
            command: Any = orjson.loads(frame.data)
        except orjson.JSONDecodeError:
            command = None
        kind = command.get("type", default) if isinstance(command, dict) else None
        label = kind if kind in known else "other"
        counter = counters.get(label)
        if counter is None:
            counter = counters[label] = counted.labels(endpoint, label)
        counter.inc()
        if not isinstance(command, dict):
            await ws.send_str(error_frame("frames must be JSON objects"))
        elif kind == REFRESH:
            await refresh(ws, ctx.verifier, token, command)
        elif kind not in known:
            await ws.send_str(error_frame(f"unknown type; known: {', '.join(known)}"))
        else:
            yield kind, command


async def refresh(
    ws: web.WebSocketResponse,
    verifier: TokenVerifier,
    token: SocketToken,
    command: dict[str, Any],
) -> None:
    """`{"type": "refresh", "token": "<jwt>"}`: a fresh token moves the socket's deadline.

    The token is verified like any other. One that does not verify (garbage, expired, a bad
    signature, keys unavailable) is answered with an error frame and changes nothing: the
    socket still closes at its old deadline, so a failed refresh gains nothing and a client
    may try again. One that verifies but names another identity (tenant, user or role)
    closes the socket with 4001: a socket's identity is fixed when it opens (its channel,
    its room, the role its audit rows record), so a changed role reconnects to take effect,
    and a client holding someone else's token gets nothing from it."""
    raw = command.get("token")
    if not isinstance(raw, str) or not raw:
        await ws.send_str(error_frame('token: refresh takes "token": "<jwt>"', REFUSED))
        return
    try:
        identity, expires_at = await verifier.verify_until(raw)
    except TokenError as exc:
        await ws.send_str(error_frame(f"token: {exc.reason}", REFUSED))
        return
    if identity != token.identity:
        log.info(
            "websocket refresh named another identity",
            extra={"tenant_id": token.identity.tenant_id},
        )
        await ws.close(code=UNAUTHORIZED, message=b"refresh token names another identity")
        return
    token.renew(expires_at)
    at = datetime.fromtimestamp(expires_at, UTC).isoformat()
    left = round(max(0.0, expires_at - time.time()), 1)
    await ws.send_str(dumps({"type": "refreshed", "expires_at": at, "expires_in": left}).decode())


class RateLimit:
    """A token bucket per connection: `rate` frames a second on average, `burst` at once."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def error_frame(detail: str, code: str = "bad_frame") -> str:
    return dumps({"type": "error", "code": code, "detail": detail}).decode()


async def close_all(app: web.Application) -> None:
    """On shutdown: "going away", so clients reconnect (to another instance)."""
    for ws in list(app[SOCKETS].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
    app[SOCKETS].deadlines.close()


def add_routes(app: web.Application) -> None:
    """The shared state of the socket endpoints (`ws_notifications`, `ws_chat`)."""
    app[SOCKETS] = OpenSockets()
    app.on_shutdown.append(close_all)
