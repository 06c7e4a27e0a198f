"""`/ws/notifications/{tenant_id}/{user_id}/`: one user's live feed.

New in-app notifications, delivery status changes, unread-count updates and new 1-on-1
messages arrive as they happen; `?since=<offset>` replays what a reconnecting client missed.
The client may send `mark_read` (ids or all), `ping`, and `refresh` (a fresh token, before
the socket's own expires: see `websockets`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from notifyd.auth import policy
from notifyd.auth.identity import Identity
from notifyd.http.context import client_ip, request_id, services
from notifyd.http.limits import take_seat
from notifyd.http.websockets import (
    FORBIDDEN,
    accept,
    catch_up,
    commands,
    error_frame,
    live,
    refuse,
    replay,
)
from notifyd.ids import parse_uuid
from notifyd.payloads import dumps
from notifyd.store import audit
from notifyd.store import notifications as notification_store
from notifyd.store.audit import AuditEntry

ENDPOINT = "notifications"
COMMANDS = ("mark_read", "ping")


async def notifications_socket(request: web.Request) -> web.StreamResponse:
    ws, token = await accept(request)
    if token is None:
        return ws
    caller = token.identity  # fixed for the socket's life: a refresh cannot change it
    if not policy.may_watch_feed(
        caller, request.match_info["tenant_id"], request.match_info["user_id"]
    ):
        return await refuse(request, ws, FORBIDDEN, b"this is not your notification channel")
    ctx = services(request)
    channel = ctx.keys.user_events(caller.tenant_id, caller.user_id)
    capped = await take_seat(request, ws, caller)
    if capped is None:
        return ws
    async with live(request, ws, token, channel, ENDPOINT, capped) as subscriber:
        replayed_to = await replay(
            ws,
            request,
            lambda since: ctx.history.since(caller.tenant_id, caller.user_id, since),
            refetch="GET /notifications/",
        )
        if await catch_up(ws, request, subscriber, replayed_to):
            unread = await notification_store.unread_count(
                ctx.pool, caller.tenant_id, caller.user_id
            )
            await ws.send_str(dumps({"type": "unread_count", "count": unread}).decode())
            # read here, not in a helper: one frame less waiting under every idle socket
            async for kind, command in commands(ws, request, ENDPOINT, COMMANDS, token):
                if kind == "mark_read":
                    await _mark_read(ws, request, caller, command)
                else:  # ping
                    await ws.send_str('{"type":"pong"}')
    return ws


async def _mark_read(
    ws: web.WebSocketResponse, request: web.Request, caller: Identity, command: dict[str, Any]
) -> None:
    ctx = services(request)
    raw_ids = command.get("ids")
    everything = command.get("all") is True
    ids = None
    if not everything:
        if not isinstance(raw_ids, list) or len(raw_ids) > ctx.settings.mark_read_max_ids:
            await ws.send_str(error_frame('mark_read takes "ids": [...] or "all": true'))
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
                ip_address=client_ip(request),
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
    await ctx.history.signal_user(
        caller.tenant_id,
        caller.user_id,
        {"type": "unread_count", "count": unread, "updated": updated},
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws/notifications/{tenant_id}/{user_id}/", notifications_socket)
