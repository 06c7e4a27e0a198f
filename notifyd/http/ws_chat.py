"""`/ws/chat/{room}/`: a chat room, live.

The client sends (every frame counts against the connection's rate limit):
- `{"message": "...", "receiver_id": "...", "client_id": "..."}`: a message (the first seed's
  frame; `type` may be omitted or `"message"`). In a 1-on-1 room `receiver_id`, when given,
  must be the other member; in a group room it must be absent. `client_id` is echoed so a
  client can match its own message when it comes back.
- `{"type": "typing", "typing": true}`, `{"type": "read", "up_to": "<message id>"}`,
  `{"type": "ping"}`, and `{"type": "refresh", "token": "<jwt>"}` before the socket's token
  expires (see `websockets`).

Every member receives `{"type": "message", "room", "id", "sender_id", "receiver_id",
"message", "sent_at", "offset"}` (the sender too: that is its acknowledgement), `read`
receipts, `typing`, and `join`/`leave` when a member's first socket opens or last one closes
on any instance. The first frame is `{"type": "presence", "online": [...]}`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from notifyd.auth.identity import Identity
from notifyd.http.context import client_ip, request_id, services
from notifyd.http.limits import take_seat
from notifyd.http.problems import FieldError
from notifyd.http.validation import schemas
from notifyd.http.websockets import (
    FORBIDDEN,
    NOT_FOUND,
    accept,
    catch_up,
    commands,
    error_frame,
    live,
    refuse,
    replay,
)
from notifyd.ids import parse_uuid, uuid7
from notifyd.payloads import dumps
from notifyd.realtime.chat import REMOVAL_PREFIX, Draft, NotAMember, Room, RoomNotFound
from notifyd.schemas.errors import Invalid
from notifyd.store import audit
from notifyd.store.audit import AuditEntry

ENDPOINT = "chat"
COMMANDS = ("message", "typing", "read", "ping")


async def chat_socket(request: web.Request) -> web.StreamResponse:
    ws, token = await accept(request)
    if token is None:
        return ws
    caller = token.identity  # fixed for the socket's life: a refresh cannot change it
    ctx = services(request)
    name = request.match_info["room"]
    try:
        room = await ctx.chat.open(caller.tenant_id, name, caller.user_id)
    except RoomNotFound:
        return await refuse(request, ws, NOT_FOUND, b"no such room")
    except NotAMember:
        return await refuse(request, ws, FORBIDDEN, b"not a member of this room")
    me = dumps({"user_id": caller.user_id})[1:-1]

    def removes_me(payload: bytes) -> bool:
        return payload.startswith(REMOVAL_PREFIX) and me in payload

    channel = ctx.keys.room_events(caller.tenant_id, name)
    poster = _Poster(request, caller, room)
    capped = await take_seat(request, ws, caller)
    if capped is None:
        return ws
    async with live(request, ws, token, channel, ENDPOINT, capped) as subscriber:
        seat, online = await ctx.presence.join(caller.tenant_id, name, caller.user_id)
        try:
            await ws.send_str(dumps({"type": "presence", "room": name, "online": online}).decode())
            replayed_to = await replay(
                ws,
                request,
                lambda since: ctx.history.since_in_room(caller.tenant_id, name, since),
                refetch=f"GET /rooms/{name}/messages/",
            )
            if await catch_up(ws, request, subscriber, replayed_to, ends_with=removes_me):
                # read here, not in a helper: one frame less waiting under every socket
                async for kind, command in commands(
                    ws, request, ENDPOINT, COMMANDS, token, default="message"
                ):
                    if kind == "message":
                        await poster.post(ws, command)
                    elif kind == "typing":
                        await ctx.chat.typing(
                            room, caller.user_id, command.get("typing") is not False
                        )
                    elif kind == "read":
                        await _read_receipt(ws, request, caller, room, command, poster)
                    else:  # ping
                        await ws.send_str('{"type":"pong"}')
        finally:
            await ctx.presence.leave(seat)
    return ws


class _Poster:
    """Turns one socket's message frames into drafts for `Chat.post`.

    What every message of a socket shares is worked out once, when the socket opens: the
    other member of a 1-on-1 room, and the audit row's address (parsed through the trusted
    proxies), request id and fixed details. Per message that leaves the checks, an id and
    two small objects: in a busy room this path runs for every frame. The socket's read
    receipts take their audit rows from here too."""

    __slots__ = (
        "_chat",
        "_ip_address",
        "_peer",
        "_reader",
        "_request_id",
        "_role",
        "_room",
        "_sender_id",
        "_tenant_id",
    )

    def __init__(self, request: web.Request, caller: Identity, room: Room) -> None:
        ctx = services(request)
        self._chat = ctx.chat
        self._reader = schemas(request).chat_post
        self._room = room
        self._tenant_id = caller.tenant_id
        self._sender_id = caller.user_id
        self._role = caller.role
        self._peer = room.peer_of(caller.user_id)
        self._ip_address = client_ip(request)
        self._request_id = request_id(request) or None

    def problem(self, command: dict[str, Any]) -> str | None:
        """Every field at fault in a message frame (`schemas.messages.ChatPost`, and the room's
        receiver rule), named; None when nothing is."""
        errors: list[FieldError] = []
        try:
            self._reader.python(command)
        except Invalid as exc:
            errors = exc.errors
        receiver_id = command.get("receiver_id")
        if isinstance(receiver_id, str) and receiver_id != self._peer:
            errors.append(
                FieldError(
                    "receiver_id",
                    "must be the other member of this 1-on-1 room"
                    if self._room.is_dm
                    else "group rooms have no single receiver; leave it out",
                )
            )
        if not errors:
            return None
        return "; ".join(f"{e.field}: {e.message}" for e in errors)

    def audit(self, action: str, details: dict[str, Any]) -> AuditEntry:
        """An audit row for a write this socket's caller made."""
        return AuditEntry(
            tenant_id=self._tenant_id,
            user_id=self._sender_id,
            action=action,
            ip_address=self._ip_address,
            request_id=self._request_id,
            details={"role": self._role, "via": "websocket", **details},
        )

    async def post(self, ws: web.WebSocketResponse, command: dict[str, Any]) -> None:
        problem = self.problem(command)
        if problem is not None:
            await ws.send_str(error_frame(problem))
            return
        message_id = uuid7()
        room = self._room
        details = {"message_id": str(message_id), "receiver_id": self._peer, "room": room.name}
        draft = Draft(
            room=room,
            sender_id=self._sender_id,
            content=command["message"],
            audit=self.audit("message.send", details),
            client_id=command.get("client_id"),
            id=message_id,
            receiver_id=self._peer,
        )
        try:
            await self._chat.post(draft)
        except NotAMember:
            await ws.close(code=FORBIDDEN, message=b"no longer a member of this room")


async def _read_receipt(
    ws: web.WebSocketResponse,
    request: web.Request,
    caller: Identity,
    room: Room,
    command: dict[str, Any],
    poster: _Poster,
) -> None:
    ctx = services(request)
    raw = command.get("up_to")
    up_to = parse_uuid(raw) if isinstance(raw, str) else None
    if up_to is None:
        await ws.send_str(error_frame("up_to: must be the id of a message in this room"))
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        changed = await ctx.chat.mark_read(conn, room, caller.user_id, up_to)
        if changed:
            await audit.record(
                conn,
                poster.audit("message.mark_read", {"room": room.name, "up_to": str(up_to)}),
            )
    if changed:
        await ctx.chat.announce_read(room, caller.user_id, up_to)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws/chat/{room}/", chat_socket)
