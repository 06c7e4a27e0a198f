"""WebSocket endpoints. This slice: `/ws/notifications/{tenant_id}/{user_id}/`.

The token comes from `Authorization: Bearer …`, from `Sec-WebSocket-Protocol: bearer,
<token>` (browsers cannot set headers on a WebSocket), or from `?token=`. The socket is
accepted first and then closed with a code and reason when something is wrong, because a
browser never shows the body of a refused handshake:

- 4001 the token is missing, invalid or expired
- 4003 the path's tenant or user is not the token's
- 4008 the client did not read fast enough (its bounded queue overflowed)
- 1001 the server is shutting down (reconnect, possibly elsewhere)

An `Origin` header must be in `NOTIFYD_WS_ALLOWED_ORIGINS` (or, when that is empty, name the
same host as the request); clients that send none (servers, CLIs) are not browsers and pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from notifyd.auth.identity import Identity
from notifyd.auth.tokens import TokenError
from notifyd.http.context import request_id, services
from notifyd.ids import parse_uuid
from notifyd.payloads import dumps
from notifyd.realtime.history import after, is_offset
from notifyd.realtime.hub import CLOSED, Subscriber
from notifyd.store import audit
from notifyd.store import notifications as notification_store
from notifyd.store.audit import AuditEntry

log = logging.getLogger("notifyd.http.websockets")

_OFFSET_PREFIX = b'{"offset":"'
UNAUTHORIZED = 4001
FORBIDDEN = 4003
TOO_SLOW = 4008


class OpenSockets:
    """The sockets this instance holds, to close them with "going away" on shutdown."""

    def __init__(self) -> None:
        self.sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()


SOCKETS = web.AppKey("websockets", OpenSockets)


def _token(request: web.Request) -> tuple[str | None, str | None]:
    """(token, the subprotocol to answer with when it came that way)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip(), None
    offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
    if len(offered) >= 2 and offered[0].lower() == "bearer" and offered[1]:
        return offered[1], offered[0]
    query = request.query.get("token")
    return (query or None), None


def origin_allowed(request: web.Request, allowed: tuple[str, ...]) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if allowed:
        return "*" in allowed or origin in allowed
    return urlsplit(origin).netloc == request.host


async def notifications_socket(request: web.Request) -> web.StreamResponse:
    ctx = services(request)
    s = ctx.settings
    if not origin_allowed(request, s.ws_allowed_origins):
        raise web.HTTPForbidden(text="origin not allowed")
    token, protocol = _token(request)
    ws = web.WebSocketResponse(
        heartbeat=s.ws_heartbeat,
        max_msg_size=s.ws_max_frame,
        protocols=(protocol,) if protocol else (),
    )
    await ws.prepare(request)
    caller = await _authenticate(ws, request, token)
    if caller is None:
        return ws
    if (caller.tenant_id, caller.user_id) != (
        request.match_info["tenant_id"],
        request.match_info["user_id"],
    ):
        await ws.close(code=FORBIDDEN, message=b"this is not your notification channel")
        return ws
    hub = ctx.hub
    request.app[SOCKETS].sockets.add(ws)
    subscriber = Subscriber(s.ws_send_queue)
    channel = ctx.keys.user_events(caller.tenant_id, caller.user_id)
    await hub.subscribe(channel, subscriber)
    ctx.metrics.ws_connections.labels("notifications").inc()
    writer: asyncio.Task[None] | None = None
    try:
        # subscribed first, replayed second: nothing falls between the two, and the writer
        # skips live events the replay already sent
        replayed_to = await _replay(ws, request, caller)
        writer = asyncio.create_task(_write(ws, subscriber, replayed_to), name="ws-writer")
        unread = await notification_store.unread_count(ctx.pool, caller.tenant_id, caller.user_id)
        await ws.send_str(dumps({"type": "unread_count", "count": unread}).decode())
        await _read(ws, request, caller)
    finally:
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        await hub.unsubscribe(channel, subscriber)
        ctx.metrics.ws_connections.labels("notifications").dec()
        if subscriber.overflowed:
            ctx.metrics.ws_dropped.inc()
    return ws


async def _authenticate(
    ws: web.WebSocketResponse, request: web.Request, token: str | None
) -> Identity | None:
    if token is None:
        await ws.close(code=UNAUTHORIZED, message=b"send a bearer token")
        return None
    try:
        return await services(request).verifier.verify(token)
    except TokenError as exc:
        await ws.close(code=UNAUTHORIZED, message=exc.reason.encode()[:120])
        return None


async def _replay(ws: web.WebSocketResponse, request: web.Request, caller: Identity) -> str | None:
    """With `?since=<offset>`: what the client missed, in order (or a `gap` frame when some
    of it is no longer kept); returns the last offset sent."""
    since = request.query.get("since")
    if not since:
        return None
    if not is_offset(since):
        await ws.send_str(_error("since must be an offset taken from an earlier event"))
        return None
    ctx = services(request)
    missed = await ctx.history.since(
        caller.tenant_id, caller.user_id, since, ctx.settings.ws_history_len
    )
    if missed.gap:
        await ws.send_str(
            dumps(
                {
                    "type": "gap",
                    "since": since,
                    "detail": "some events after this offset are no longer kept; "
                    "refetch GET /notifications/",
                }
            ).decode()
        )
    last = None
    for offset, payload in missed.events:
        await ws.send_str(payload.decode())
        last = offset
    return last


def _offset_of(payload: bytes) -> str | None:
    if not payload.startswith(_OFFSET_PREFIX):
        return None
    end = payload.find(b'"', len(_OFFSET_PREFIX))
    return payload[len(_OFFSET_PREFIX) : end].decode() if end > 0 else None


async def _write(
    ws: web.WebSocketResponse, subscriber: Subscriber, replayed_to: str | None
) -> None:
    """The writer of live events: in the order the hub queued them, one task per socket."""
    while True:
        payload = await subscriber.queue.get()
        if payload == CLOSED:
            await ws.close(code=TOO_SLOW, message=b"too slow: events were not read in time")
            return
        if replayed_to is not None:
            offset = _offset_of(payload)
            if offset is not None and not after(offset, replayed_to):
                continue  # already sent by the replay
        await ws.send_str(payload.decode())


async def _read(ws: web.WebSocketResponse, request: web.Request, caller: Identity) -> None:
    async for message in ws:
        if message.type != WSMsgType.TEXT:
            continue
        try:
            command: Any = orjson.loads(message.data)
        except orjson.JSONDecodeError:
            await ws.send_str(_error("frames must be JSON objects"))
            continue
        if not isinstance(command, dict):
            await ws.send_str(_error("frames must be JSON objects"))
        elif command.get("type") == "mark_read":
            await _mark_read(ws, request, caller, command)
        elif command.get("type") == "ping":
            await ws.send_str('{"type":"pong"}')
        else:
            await ws.send_str(_error("unknown command; known: mark_read, ping"))


def _error(detail: str) -> str:
    return dumps({"type": "error", "detail": detail}).decode()


async def _mark_read(
    ws: web.WebSocketResponse, request: web.Request, caller: Identity, command: dict[str, Any]
) -> None:
    ctx = services(request)
    raw_ids = command.get("ids")
    everything = command.get("all") is True
    ids = None
    if not everything:
        if not isinstance(raw_ids, list) or len(raw_ids) > ctx.settings.mark_read_max_ids:
            await ws.send_str(_error('mark_read takes "ids": [...] or "all": true'))
            return
        ids = [i for i in (parse_uuid(r) if isinstance(r, str) else None for r in raw_ids) if i]
    async with ctx.pool.acquire() as conn, conn.transaction():
        updated = await notification_store.mark_read(conn, caller.tenant_id, caller.user_id, ids)
        unread = await notification_store.unread_count(conn, caller.tenant_id, caller.user_id)
        await audit.record(
            conn,
            AuditEntry(
                tenant_id=caller.tenant_id,
                user_id=caller.user_id,
                action="notification.mark_read",
                ip_address=request.remote,
                request_id=request_id(request) or None,
                details={
                    "role": caller.role,
                    "via": "websocket",
                    "all": everything,
                    "ids": [str(i) for i in ids or []],
                    "updated": updated,
                },
            ),
        )
    # every socket of this user (on any instance) learns the new count
    await ctx.redis.publish(
        ctx.keys.user_events(caller.tenant_id, caller.user_id),
        dumps({"type": "unread_count", "count": unread, "updated": updated}),
    )


async def close_all(app: web.Application) -> None:
    """On shutdown: "going away", so clients reconnect (to another instance)."""
    for ws in list(app[SOCKETS].sockets):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def add_routes(app: web.Application) -> None:
    app[SOCKETS] = OpenSockets()
    app.on_shutdown.append(close_all)
    app.router.add_get("/ws/notifications/{tenant_id}/{user_id}/", notifications_socket)
