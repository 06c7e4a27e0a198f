"""Chat rooms over REST: create group rooms, manage members, find a 1-on-1 room's name, and
read a room's messages (what a client refetches after a `gap`).

Who may do what: a user who creates a room is in it as its owner; services and admins act for
the tenant and may create rooms for others, look at any group room and manage its members.
Owners add and remove members; anyone may leave. Nobody outside a 1-on-1 room may see it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from notifyd.auth import policy
from notifyd.http.context import audit_entry, identity, services
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.messages import message_json
from notifyd.http.problems import FieldError, Problem, forbidden, invalid, not_found, unsendable
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import uuid7
from notifyd.realtime.chat import NotAMember, Room, RoomNotFound
from notifyd.realtime.roomname import dm_members
from notifyd.store import audit
from notifyd.store import messages as message_store
from notifyd.store import rooms as store


def _member_json(member: store.Member) -> dict[str, Any]:
    return {
        "user_id": member.user_id,
        "role": member.role,
        "joined_at": iso(member.joined_at),
        "last_read_id": str(member.last_read_id) if member.last_read_id else None,
    }


def _room_json(room: store.RoomRow) -> dict[str, Any]:
    """A group room as a list shows it (one room's answer adds its members)."""
    return {
        "name": room.name,
        "kind": "group",
        "title": room.title,
        "created_by": room.created_by,
        "created_at": iso(room.created_at),
    }


async def _open(request: web.Request, name: str) -> Room:
    """The room as the caller may use it, or the problem that says why not."""
    ctx = services(request)
    caller = identity(request)
    admin = policy.may_enter_any_room(caller, dm=dm_members(name) is not None)
    try:
        return await ctx.chat.open(caller.tenant_id, name, caller.user_id, admin=admin)
    except RoomNotFound:
        raise not_found("room") from None
    except NotAMember:
        raise forbidden("you are not a member of this room") from None


async def _group_json(request: web.Request, room: Room) -> dict[str, Any]:
    ctx = services(request)
    assert room.room_id is not None
    row = await store.get(ctx.pool, room.tenant_id, room.name)
    if row is None:
        raise not_found("room")
    members = await store.members(ctx.pool, room.room_id)
    return {**_room_json(row), "members": [_member_json(m) for m in members]}


def _dm_json(room: Room) -> dict[str, Any]:
    assert room.pair is not None
    return {"name": room.name, "kind": "dm", "members": list(room.pair)}


async def create_room(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    await check_send_rate(request)
    asked = await read_model(request, schemas(request).room_create)
    name, title = asked.name, asked.title
    members = list(dict.fromkeys(asked.members))
    for_tenant = policy.acts_for_tenant(caller)  # else a user: in the room it creates, its owner
    if not for_tenant:
        members = [caller.user_id, *(m for m in members if m != caller.user_id)]
    # the caller's role decides these, not the body's shape: `unsendable`, as for a send
    if len(members) > ctx.settings.room_max_members:
        raise unsendable(
            [FieldError("members", f"a room has at most {ctx.settings.room_max_members} members")]
        )
    if not members:
        raise unsendable([FieldError("members", "a room needs at least one member")])
    room_id = uuid7()
    name = name or f"room-{room_id.hex}"
    owner = None if for_tenant else caller.user_id
    async with ctx.pool.acquire() as conn, conn.transaction():
        created_at = await store.create(
            conn, room_id, caller.tenant_id, name, title or "", caller.user_id, members, owner
        )
        if created_at is None:
            raise Problem(409, f"a room named {name!r} already exists", kind="conflict")
        await audit.record(
            conn, audit_entry(request, "room.create", {"room": name, "members": members})
        )
        rows = await store.members(conn, room_id)
        body = {
            "name": name,
            "kind": "group",
            "title": title or "",
            "created_by": caller.user_id,
            "created_at": iso(created_at),
            "members": [_member_json(m) for m in rows],
        }
        return await remember(request, conn, json_response(body, status=201))


async def list_rooms(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).page_query)
    limit, before = query.limit, query.before
    rows = await store.rooms_of(
        ctx.pool, caller.tenant_id, caller.user_id, before=before, limit=limit + 1
    )
    rows, headers = page(request, rows, limit)
    return json_response([_room_json(r) for r in rows], headers=headers)


async def dm_room(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    other = request.match_info["other_user_id"]
    problem = ctx.id_rule.problem(other)
    if problem is None and other == caller.user_id:
        problem = "must be another user than the caller"
    if problem is not None:
        raise invalid([FieldError("other_user_id", problem)])
    return json_response(_dm_json(Room.dm(caller.tenant_id, caller.user_id, other)))


async def get_room(request: web.Request) -> web.Response:
    room = await _open(request, request.match_info["room"])
    if room.is_dm:
        return json_response(_dm_json(room))
    return json_response(await _group_json(request, room))


async def room_messages(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    room = await _open(request, request.match_info["room"])
    query = read_query(request, schemas(request).page_query)
    limit, before = query.limit, query.before
    peer = room.peer_of(caller.user_id)
    if peer is not None:
        rows = await message_store.list_for_user(
            ctx.pool,
            caller.tenant_id,
            caller.user_id,
            with_user=peer,
            before=before,
            limit=limit + 1,
        )
    else:
        assert room.room_id is not None
        rows = await message_store.list_room(ctx.pool, room.room_id, before=before, limit=limit + 1)
    rows, headers = page(request, rows, limit)
    return json_response([message_json(r, room.name) for r in rows], headers=headers)


async def add_members(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    room = await _open(request, request.match_info["room"])
    if room.room_id is None:
        raise forbidden("a 1-on-1 room always has exactly its two members")
    members = list(
        dict.fromkeys((await read_model(request, schemas(request).room_members)).members)
    )
    async with ctx.pool.acquire() as conn, conn.transaction():
        role = await store.role_of(conn, room.room_id, caller.user_id)
        if not policy.may_manage_room(caller, role):
            raise forbidden("only the room's owners (and tenant admins) add members")
        # serialise concurrent additions so the size limit holds
        await conn.execute("SELECT 1 FROM rooms WHERE id = $1 FOR UPDATE", room.room_id)
        current = len(await store.members(conn, room.room_id))
        new = [m for m in members if await store.role_of(conn, room.room_id, m) is None]
        if current + len(new) > ctx.settings.room_max_members:
            raise unsendable(
                [
                    FieldError(
                        "members", f"a room has at most {ctx.settings.room_max_members} members"
                    )
                ]
            )
        added = await store.add_members(conn, room.room_id, room.tenant_id, new)
        await audit.record(
            conn, audit_entry(request, "room.add_members", {"room": room.name, "added": added})
        )
        return await remember(request, conn, json_response({"added": added}))


async def remove_member(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    room = await _open(request, request.match_info["room"])
    if room.room_id is None:
        raise forbidden("a 1-on-1 room always has exactly its two members")
    user_id = request.match_info["user_id"]
    async with ctx.pool.acquire() as conn, conn.transaction():
        role = await store.role_of(conn, room.room_id, caller.user_id)
        if not policy.may_remove_member(caller, role, user_id):
            raise forbidden("only the room's owners (and tenant admins) remove others")
        if not await store.remove_member(conn, room.room_id, user_id):
            raise not_found("member")
        await audit.record(
            conn, audit_entry(request, "room.remove_member", {"room": room.name, "user": user_id})
        )
    await ctx.chat.removed(room, user_id)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    for base in ("/rooms", "/api/rooms"):
        app.router.add_post(f"{base}/", create_room)
        app.router.add_get(f"{base}/", list_rooms)
        app.router.add_get(f"{base}/dm/{{other_user_id}}", dm_room)
        app.router.add_get(f"{base}/dm/{{other_user_id}}/", dm_room)
        app.router.add_get(f"{base}/{{room}}/", get_room)
        app.router.add_get(f"{base}/{{room}}/messages/", room_messages)
        app.router.add_post(f"{base}/{{room}}/members/", add_members)
        app.router.add_delete(f"{base}/{{room}}/members/{{user_id}}/", remove_member)
