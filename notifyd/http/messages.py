"""1-on-1 messages: send, list (all or one conversation), mark as read."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from notifyd.http.context import audit_entry, identity, services
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import Fields, query_fields, read_json_object
from notifyd.ids import uuid7
from notifyd.realtime.chat import Room
from notifyd.realtime.roomname import dm_name
from notifyd.store import audit
from notifyd.store import messages as store


def message_json(row: asyncpg.Record, room: str | None = None) -> dict[str, Any]:
    """`room` names a group room; a 1-on-1 message's room is derived from its two users."""
    receiver = row["receiver_id"]
    return {
        "id": str(row["id"]),
        "room": room if receiver is None else dm_name(row["sender_id"], receiver),
        "sender_id": row["sender_id"],
        "receiver_id": receiver,
        "content": row["content"],
        "sent_at": iso(row["sent_at"]),
        "is_read": row["read_at"] is not None,
        "read_at": iso(row["read_at"]),
    }


async def send_message(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    await check_send_rate(request)
    fields = Fields(await read_json_object(request), ctx.id_rule)
    receiver_id = fields.opaque_id("receiver_id")
    content = fields.string("content", max_length=ctx.settings.message_max_length)
    if receiver_id is not None and receiver_id == caller.user_id:
        fields.error("receiver_id", "must be another user than the sender")
    fields.done()
    assert receiver_id is not None
    assert content is not None
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
    query = query_fields(request, ctx.id_rule)
    limit = query.page_limit(ctx.settings.page_size_default, ctx.settings.page_size_max)
    before = query.cursor()
    with_user = query.opaque_id("with", required=False)
    query.done()
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
    fields = Fields(await read_json_object(request), ctx.id_rule)
    ids = fields.uuid_list("ids", max_items=ctx.settings.mark_read_max_ids)
    from_user = fields.opaque_id("with", required=False)
    everything = fields.boolean("all")
    chosen = [
        n
        for n, v in (("ids", ids), ("with", from_user), ("all", everything or None))
        if v is not None
    ]
    if len(chosen) != 1 and not fields.errors:
        fields.error("ids", 'send exactly one of "ids": [...], "with": <user id> or "all": true')
    fields.done()
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
    app.router.add_post("/messages/send/", send_message)
    app.router.add_post("/api/messages/send/", send_message)
    app.router.add_get("/messages/", list_messages)
    app.router.add_get("/api/messages/", list_messages)
    app.router.add_post("/messages/mark-as-read/", mark_messages_read)
    app.router.add_post("/api/messages/mark-as-read/", mark_messages_read)
