"""1-on-1 messages: send, list (all or one conversation), mark as read."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from notifyd.http.context import audit_entry, identity, services
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.problems import FieldError, invalid
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import uuid7
from notifyd.realtime.chat import Room
from notifyd.realtime.roomname import dm_name
from notifyd.store import audit
from notifyd.store import messages as store


def message_json(m: store.Message, room: str | None = None) -> dict[str, Any]:
    """`room` names a group room; a 1-on-1 message's room is derived from its two users."""
    receiver = m.receiver_id
    return {
        "id": str(m.id),
        "room": room if receiver is None else dm_name(m.sender_id, receiver),
        "sender_id": m.sender_id,
        "receiver_id": receiver,
        "content": m.content,
        "sent_at": iso(m.sent_at),
        "is_read": m.read_at is not None,
        "read_at": iso(m.read_at),
    }


async def send_message(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    await check_send_rate(request)
    body = await read_model(request, schemas(request).message_send)
    receiver_id, content = body.receiver_id, body.content
    if receiver_id == caller.user_id:  # the one rule that depends on who asks
        raise invalid([FieldError("receiver_id", "must be another user than the sender")])
    message_id = uuid7()
    room = Room.dm(caller.tenant_id, caller.user_id, receiver_id)
    async with ctx.pool.acquire() as conn, conn.transaction():
        message = await ctx.chat.insert_direct(conn, message_id, room, caller.user_id, content)
        await audit.record(
            conn,
            audit_entry(
                request,
                "message.send",
                {"message_id": str(message_id), "receiver_id": receiver_id},
            ),
        )
        answer = await remember(
            request,
            conn,
            json_response(
                {"message_id": str(message_id), "sent_at": iso(message.sent_at)}, status=201
            ),
        )
    # committed: now the receiver's open sockets (any instance) see it live
    await ctx.chat.announce(message)
    return answer


async def list_messages(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).message_query)
    limit, before, with_user = query.limit, query.before, query.with_
    rows = await store.list_for_user(
        ctx.pool,
        caller.tenant_id,
        caller.user_id,
        with_user=with_user,
        before=before,
        limit=limit + 1,
    )
    rows, headers = page(request, rows, limit)
    return json_response([message_json(r) for r in rows], headers=headers)


async def mark_messages_read(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    body = await read_model(request, schemas(request).message_mark_read)
    ids, from_user = body.ids, body.with_
    async with ctx.pool.acquire() as conn, conn.transaction():
        updated, newest = await store.mark_read(
            conn, caller.tenant_id, caller.user_id, ids=ids, from_user=from_user
        )
        await audit.record(
            conn,
            audit_entry(
                request,
                "message.mark_read",
                {"ids": [str(i) for i in ids or []], "with": from_user, "updated": updated},
            ),
        )
        answer = await remember(request, conn, json_response({"updated": updated}))
    # a read receipt in each conversation that changed, as the chat socket would send
    for sender, up_to in newest.items():
        room = Room.dm(caller.tenant_id, caller.user_id, sender)
        await ctx.chat.announce_read(room, caller.user_id, up_to)
    return answer


def add_routes(app: web.Application) -> None:
    for base in ("/messages", "/api/messages"):
        app.router.add_post(f"{base}/send/", send_message)
        app.router.add_get(f"{base}/", list_messages)
        app.router.add_post(f"{base}/mark-as-read/", mark_messages_read)
