"""Chat rooms over WebSocket (/ws/chat/{room}/) and REST (/rooms/...), across two instances."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.keys import Keys
from notifyd.payloads import dumps
from notifyd.realtime.chat import REMOVAL_PREFIX, ChatMessage, Room, removal_event
from notifyd.realtime.history import framed
from notifyd.realtime.presence import Presence
from notifyd.realtime.roomname import dm_members, dm_name, is_group_name
from tests.conftest import DaemonFactory
from tests.helpers import Api, next_json, token, wait_for

TENANT = "TEN-0001"
ALICE, BOB, CAROL = "auth0|alice", "bob_1:x", "carol"


def connect(
    session: aiohttp.ClientSession,
    daemon: Daemon,
    room: str,
    user: str,
    *,
    tenant: str = TENANT,
    since: str | None = None,
) -> Any:
    url = f"ws://127.0.0.1:{daemon.port}/ws/chat/{room}/"
    if since is not None:
        url += f"?since={since}"
    bearer = token(daemon.settings, tenant, user)
    return session.ws_connect(url, headers={"Authorization": f"Bearer {bearer}"})


async def next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> Any:
    while True:
        event = await next_json(ws)
        if event["type"] == kind:
            return event


async def close_code(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The code of the server's close frame (what a browser's onclose reports); aiohttp's
    own `close_code` turns into 1006 when its reply cannot be written any more."""
    while True:
        message = await ws.receive(timeout=10)
        if message.type == aiohttp.WSMsgType.CLOSE:
            return int(message.data)
        if message.type == aiohttp.WSMsgType.CLOSED:
            return ws.close_code


async def create_room(
    daemon: Daemon, owner: str, members: list[str], name: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"members": members}
    if name is not None:
        body["name"] = name
    async with Api(daemon) as api:
        status, room, _ = await api.post("/rooms/", body, tenant=TENANT, user=owner)
    assert status == 201, room
    return dict(room)


# --- room names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "two"),
    [
        ("a_b", "c"),
        ("a", "b_c"),
        ("x|y", "x:y"),
        ("dm.a.b", "a.b"),
        ("auth0|42", "google-oauth2|42"),
        ("é", "ü:1"),
    ],
)
def test_a_dm_name_decodes_to_exactly_its_pair_in_either_order(one: str, two: str) -> None:
    name = dm_name(one, two)
    assert name == dm_name(two, one)
    assert dm_members(name) == tuple(sorted((one, two)))
    assert not is_group_name(name)
    assert "/" not in name and "?" not in name and "%" not in name


def test_pairs_that_join_to_the_same_text_get_different_names() -> None:
    names = {dm_name("a_b", "c"), dm_name("a", "b_c"), dm_name("a_b_c", "d"), dm_name("a", "b")}
    assert len(names) == 4


def test_only_the_canonical_form_of_a_dm_name_is_accepted() -> None:
    name = dm_name("alice", "bob")
    _, low, high = name.split(".")
    assert dm_members(f"dm.{high}.{low}") is None  # unsorted
    assert dm_members(f"dm.{low}=.{high}") is None  # padded
    assert dm_members(f"dm.{low}.{low}") is None  # a user with themselves
    assert dm_members(f"dm.{low}.{high}.x") is None
    assert dm_members("dm.!!.??") is None
    assert dm_members("general") is None


# --- 1-on-1 rooms ----------------------------------------------------------------------------


async def test_two_users_on_different_instances_chat_and_rest_sees_the_same_messages(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    a = await daemon_factory(NOTIFYD_INSTANCE_NAME="a")
    b = await daemon_factory(NOTIFYD_INSTANCE_NAME="b")
    async with Api(a) as api:
        status, found, _ = await api.get(f"/rooms/dm/{BOB}", tenant=TENANT, user=ALICE)
    assert status == 200
    room = found["name"]
    assert found == {"name": dm_name(ALICE, BOB), "kind": "dm", "members": sorted([ALICE, BOB])}
    async with connect(session, a, room, ALICE) as alice, connect(session, b, room, BOB) as bob:
        await next_of_type(alice, "presence")
        await next_of_type(bob, "presence")
        await alice.send_json({"message": "Hello Bob", "receiver_id": BOB, "client_id": "c1"})
        got = await next_of_type(bob, "message")
        echo = await next_of_type(alice, "message")
        assert got == echo
        assert got["message"] == "Hello Bob"
        assert (got["sender_id"], got["receiver_id"], got["room"]) == (ALICE, BOB, room)
        assert got["client_id"] == "c1"
        assert {"id", "sent_at", "offset"} <= got.keys()
        await bob.send_json({"message": "Hi Alice"})  # receiver_id is optional in a DM
        reply = await next_of_type(alice, "message")
        assert (reply["sender_id"], reply["receiver_id"]) == (BOB, ALICE)
    async with Api(b) as api:
        status, listed, _ = await api.get(f"/messages/?with={ALICE}", tenant=TENANT, user=BOB)
    assert status == 200
    assert [(m["id"], m["content"], m["room"]) for m in listed] == [
        (reply["id"], "Hi Alice", room),
        (got["id"], "Hello Bob", room),
    ]


async def test_a_message_sent_over_rest_reaches_open_sockets_live(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    a = await daemon_factory(NOTIFYD_INSTANCE_NAME="a")
    b = await daemon_factory(NOTIFYD_INSTANCE_NAME="b")
    room = dm_name(ALICE, BOB)
    feed_url = f"ws://127.0.0.1:{b.port}/ws/notifications/{TENANT}/{BOB}/"
    async with (
        connect(session, b, room, BOB) as chat,
        session.ws_connect(feed_url + f"?token={token(b.settings, TENANT, BOB)}") as feed,
    ):
        await next_of_type(chat, "presence")
        await next_of_type(feed, "unread_count")
        async with Api(a) as api:
            status, sent, _ = await api.post(
                "/messages/send/",
                {"receiver_id": BOB, "content": "Offer attached"},
                tenant=TENANT,
                user=ALICE,
            )
        assert status == 201
        live = await next_of_type(chat, "message")
        assert (live["id"], live["message"], live["sender_id"]) == (
            sent["message_id"],
            "Offer attached",
            ALICE,
        )
        notice = await next_of_type(feed, "new_message")
        assert (notice["id"], notice["room"], notice["sender_id"]) == (
            sent["message_id"],
            room,
            ALICE,
        )


async def test_a_reconnect_with_since_gets_exactly_what_it_missed_in_order(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    room = dm_name(ALICE, BOB)
    async with connect(session, daemon, room, BOB) as bob:
        await next_of_type(bob, "presence")
        first_offset = None
        async with connect(session, daemon, room, ALICE) as alice:
            await next_of_type(alice, "presence")
            await alice.send_json({"message": "one"})
            first_offset = (await next_of_type(bob, "message"))["offset"]
    # Bob is away; Alice writes three more (over REST and over a socket)
    async with Api(daemon) as api:
        for text in ("two", "three"):
            status, _, _ = await api.post(
                "/messages/send/", {"receiver_id": BOB, "content": text}, tenant=TENANT, user=ALICE
            )
            assert status == 201
    async with connect(session, daemon, room, ALICE) as alice:
        await next_of_type(alice, "presence")
        await alice.send_json({"message": "four"})
        await next_of_type(alice, "message")
    async with connect(session, daemon, room, BOB, since=first_offset) as bob:
        await next_of_type(bob, "presence")
        missed = [(await next_of_type(bob, "message"))["message"] for _ in range(3)]
        assert missed == ["two", "three", "four"]
        await bob.send_json({"type": "ping"})
        assert await next_of_type(bob, "pong") == {"type": "pong"}  # and nothing repeated


async def test_a_reconnect_from_an_offset_no_longer_kept_is_told_to_refetch(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_HISTORY_LEN="3", NOTIFYD_WS_MESSAGE_RATE="10000")
    room = dm_name(ALICE, BOB)
    async with connect(session, daemon, room, ALICE) as alice:
        await next_of_type(alice, "presence")
        offsets = []
        for i in range(300):  # far past the cap, so trimming (approximate) really happens
            await alice.send_json({"message": f"m{i}"})
            offsets.append((await next_of_type(alice, "message"))["offset"])
    async with connect(session, daemon, room, BOB, since=offsets[0]) as bob:
        await next_of_type(bob, "presence")
        gap = await next_of_type(bob, "gap")
        assert gap["since"] == offsets[0]
        assert f"GET /rooms/{room}/messages/" in gap["detail"]
    async with Api(daemon) as api:
        status, page, _ = await api.get(f"/rooms/{room}/messages/?limit=5", tenant=TENANT, user=BOB)
    assert status == 200
    assert [m["content"] for m in page] == ["m299", "m298", "m297", "m296", "m295"]


async def test_a_third_user_cannot_enter_a_dm_room_and_other_tenants_never_see_rooms(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    room = dm_name(ALICE, BOB)
    async with connect(session, daemon, room, CAROL) as carol:
        assert await close_code(carol) == 4003
    group = await create_room(daemon, ALICE, [BOB], name="hiring-team")
    # a user of another tenant, even with a member's user id, is in another tenant's namespace
    async with connect(session, daemon, group["name"], BOB, tenant="TEN-OTHER") as foreign:
        assert await close_code(foreign) == 4004
    async with Api(daemon) as api:
        status, body, _ = await api.get("/rooms/hiring-team/", tenant="TEN-OTHER", user=BOB)
        assert (status, body["status"]) == (404, 404)
        status, _, _ = await api.get(f"/rooms/{room}/messages/", tenant=TENANT, user=CAROL)
        assert status == 403


async def test_a_bad_origin_or_token_is_refused(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_ALLOWED_ORIGINS="https://app.example.com")
    room = dm_name(ALICE, BOB)
    bearer = token(daemon.settings, TENANT, ALICE)
    url = f"ws://127.0.0.1:{daemon.port}/ws/chat/{room}/?token={bearer}"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await session.ws_connect(url, headers={"Origin": "https://evil.example.com"})
    assert refused.value.status == 403
    async with session.ws_connect(url, headers={"Origin": "https://app.example.com"}) as ws:
        assert (await next_json(ws))["type"] == "presence"
    expired = token(daemon.settings, TENANT, ALICE, ttl=-60)
    async with session.ws_connect(
        f"ws://127.0.0.1:{daemon.port}/ws/chat/{room}/", protocols=("bearer", expired)
    ) as ws:
        assert await close_code(ws) == 4001


async def test_bad_frames_get_an_error_naming_the_field_and_store_nothing(
    daemon: Daemon, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    room = dm_name(ALICE, BOB)
    async with connect(session, daemon, room, ALICE) as alice:
        await next_of_type(alice, "presence")
        limit = daemon.settings.message_max_length
        cases = [
            ({"message": ""}, "message:"),
            ({"message": "x" * (limit + 1)}, f"at most {limit}"),
            ({"message": "a\x00b"}, "message: must not contain NUL"),
            ({"message": "hi", "receiver_id": CAROL}, "receiver_id:"),
            ({"message": "hi", "client_id": 7}, "client_id:"),
            ({"message": " ", "client_id": 7}, "message: must not be empty; client_id:"),
            ({"type": "read", "up_to": "nope"}, "up_to:"),
            ({"type": "dance"}, "unknown type"),
        ]
        for frame, expected in cases:
            await alice.send_json(frame)
            error = await next_of_type(alice, "error")
            assert expected in error["detail"], (frame, error)
        await alice.send_str("not json")
        assert (await next_of_type(alice, "error"))["code"] == "bad_frame"
    assert await db.fetchval("SELECT count(*) FROM messages") == 0


# --- group rooms -----------------------------------------------------------------------------


async def test_group_rooms_are_created_with_members_and_only_members_join(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    room = await create_room(daemon, ALICE, [BOB, BOB], name="panel-42")
    assert [(m["user_id"], m["role"]) for m in room["members"]] == [
        (ALICE, "owner"),
        (BOB, "member"),
    ]
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/rooms/", {"name": "panel-42", "members": []}, tenant=TENANT, user=BOB
        )
        assert status == 409
        status, body, _ = await api.post(
            "/rooms/", {"name": "dm.x.y", "members": ["a b"]}, tenant=TENANT, user=BOB
        )
        assert status == 422
        assert {e["field"] for e in body["errors"]} == {"name", "members[0]"}
        # found by the OpenAPI fuzzer: a list where an id belongs was a 500
        status, body, _ = await api.post(
            "/rooms/", {"members": [["user-2"]], "title": 7}, tenant=TENANT, user=BOB
        )
        assert status == 422
        assert {e["field"] for e in body["errors"]} == {"members[0]", "title"}
        status, mine, _ = await api.get("/rooms/", tenant=TENANT, user=BOB)
        assert [r["name"] for r in mine] == ["panel-42"]
    async with connect(session, daemon, "panel-42", CAROL) as carol:
        assert await close_code(carol) == 4003
    async with (
        connect(session, daemon, "panel-42", ALICE) as alice,
        connect(session, daemon, "panel-42", BOB) as bob,
    ):
        await next_of_type(alice, "presence")
        await next_of_type(bob, "presence")
        await bob.send_json({"message": "Candidate is in the lobby"})
        for ws in (alice, bob):
            event = await next_of_type(ws, "message")
            assert (event["sender_id"], event["receiver_id"]) == (BOB, None)
        await alice.send_json({"message": "to whom?", "receiver_id": BOB})
        assert "group rooms" in (await next_of_type(alice, "error"))["detail"]
    async with Api(daemon) as api:
        status, page, _ = await api.get("/rooms/panel-42/messages/", tenant=TENANT, user=ALICE)
        assert [(m["content"], m["room"]) for m in page] == [
            ("Candidate is in the lobby", "panel-42")
        ]
        # group messages are not 1-on-1 messages
        status, listed, _ = await api.get("/messages/", tenant=TENANT, user=BOB)
        assert listed == []


async def test_a_removed_member_is_disconnected_and_can_no_longer_write(
    daemon: Daemon, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create_room(daemon, ALICE, [BOB, CAROL], name="panel")
    async with (
        connect(session, daemon, "panel", BOB) as bob,
        connect(session, daemon, "panel", CAROL) as carol,
    ):
        await next_of_type(bob, "presence")
        await next_of_type(carol, "presence")
        async with Api(daemon) as api:
            status, _, _ = await api.request(
                "DELETE", f"/rooms/panel/members/{CAROL}/", tenant=TENANT, user=BOB
            )
            assert status == 403  # only owners remove others
            status, _, _ = await api.request(
                "DELETE", f"/rooms/panel/members/{CAROL}/", tenant=TENANT, user=ALICE
            )
            assert status == 204
        assert await close_code(carol) == 4003
        removed = await next_of_type(bob, "member_removed")
        assert removed["user_id"] == CAROL
    async with connect(session, daemon, "panel", CAROL) as carol:
        assert await close_code(carol) == 4003
    async with Api(daemon) as api:
        status, added, _ = await api.post(
            "/rooms/panel/members/", {"members": [CAROL, BOB]}, tenant=TENANT, user=ALICE
        )
    assert (status, added) == (200, {"added": [CAROL]})
    actions = await db.fetch("SELECT action FROM audit_log ORDER BY id")
    assert [a["action"] for a in actions] == [
        "room.create",
        "room.remove_member",
        "room.add_members",
    ]


async def test_a_removed_member_gets_every_message_up_to_the_removal_and_none_after(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    """Issue 24, point 6: a member removed from a room is disconnected on every instance and
    misses nothing in between. The cut is the room's event order, which every member's
    socket sees alike (one Redis channel for the room): Carol, on instance b, receives exactly
    the messages Bob's socket on instance a saw before her removal, every message sent
    before the removal began among them, then the removal, then a 4003 close; messages sent
    while the removal is under way fall on the same side of it for both, and none sent after
    it reach her."""
    a = await daemon_factory(NOTIFYD_INSTANCE_NAME="a")
    b = await daemon_factory(NOTIFYD_INSTANCE_NAME="b")
    await create_room(a, ALICE, [BOB, CAROL], name="panel-cut")
    removed = f"removed:{CAROL}"

    def seen(event: dict[str, Any]) -> str | None:
        if event["type"] == "message":
            return str(event["message"])
        if event["type"] == "member_removed":
            return f"removed:{event['user_id']}"
        return None

    async with (
        connect(session, a, "panel-cut", BOB) as bob,
        connect(session, b, "panel-cut", CAROL) as carol,
    ):
        await next_of_type(bob, "presence")
        await next_of_type(carol, "presence")
        bob_saw: list[str] = []
        for i in range(5):
            await bob.send_json({"message": f"before-{i}"})
        while len(bob_saw) < 5:  # acknowledged: Bob's own echo is his acknowledgement
            if (what := seen(await next_json(bob))) is not None:
                bob_saw.append(what)

        async def keep_sending() -> None:
            for i in range(10):
                await bob.send_json({"message": f"during-{i}"})
                await asyncio.sleep(0.01)

        sending = asyncio.create_task(keep_sending())
        async with Api(a) as api:
            status, _, _ = await api.request(
                "DELETE", f"/rooms/panel-cut/members/{CAROL}/", tenant=TENANT, user=ALICE
            )
        assert status == 204
        await sending
        for i in range(3):
            await bob.send_json({"message": f"after-{i}"})
        while len(bob_saw) < 5 + 10 + 3 + 1:
            if (what := seen(await next_json(bob))) is not None:
                bob_saw.append(what)
        carol_saw: list[str] = []
        while True:
            message = await carol.receive(timeout=10)
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            if (what := seen(orjson.loads(message.data))) is not None:
                carol_saw.append(what)
        assert (message.type, message.data) == (aiohttp.WSMsgType.CLOSE, 4003)
    cut = bob_saw.index(removed) + 1
    assert carol_saw == bob_saw[:cut]
    assert [f"before-{i}" for i in range(5)] == carol_saw[:5]
    assert not [m for m in carol_saw if m.startswith("after-")]


# --- presence, typing, receipts --------------------------------------------------------------


async def test_presence_join_and_leave_are_seen_across_instances(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    a = await daemon_factory(NOTIFYD_INSTANCE_NAME="a")
    b = await daemon_factory(NOTIFYD_INSTANCE_NAME="b")
    room = dm_name(ALICE, BOB)
    async with connect(session, a, room, ALICE) as alice:
        assert await next_json(alice) == {"type": "presence", "room": room, "online": [ALICE]}
        async with connect(session, b, room, BOB) as bob:
            snapshot = await next_json(bob)
            assert snapshot["online"] == sorted([ALICE, BOB])
            assert (await next_of_type(alice, "join"))["user_id"] == ALICE  # her own, first
            assert (await next_of_type(alice, "join"))["user_id"] == BOB
            # a second tab of Bob's announces nothing, closing it neither
            async with connect(session, a, room, BOB) as bob_again:
                await next_of_type(bob_again, "presence")
            await bob.send_json({"type": "typing"})
            typing = await next_of_type(alice, "typing")
            assert (typing["user_id"], typing["typing"]) == (BOB, True)
        left = await next_of_type(alice, "leave")
        assert left["user_id"] == BOB


async def test_users_of_a_crashed_instance_are_announced_as_left(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, redis_url: str
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_PRESENCE_TTL="1.5")
    room = dm_name(ALICE, BOB)
    redis = Redis.from_url(redis_url)
    try:
        # Bob's seat, taken by an "instance" that then dies: nobody refreshes it
        crashed = Presence(redis, Keys(daemon.settings.redis_prefix), ttl=1.0)
        await crashed.join(TENANT, room, BOB)
        async with connect(session, daemon, room, ALICE) as alice:
            snapshot = await next_json(alice)
            assert snapshot["online"] == sorted([ALICE, BOB])
            left = await next_of_type(alice, "leave")
            assert left["user_id"] == BOB
    finally:
        await redis.aclose()


async def test_read_receipts_reach_the_sender_and_mark_messages_read(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    room = dm_name(ALICE, BOB)
    async with (
        connect(session, daemon, room, ALICE) as alice,
        connect(session, daemon, room, BOB) as bob,
    ):
        await next_of_type(alice, "presence")
        await next_of_type(bob, "presence")
        await alice.send_json({"message": "one"})
        await alice.send_json({"message": "two"})
        await next_of_type(bob, "message")
        second = await next_of_type(bob, "message")
        await bob.send_json({"type": "read", "up_to": second["id"]})
        receipt = await next_of_type(alice, "read")
        assert (receipt["user_id"], receipt["up_to"]) == (BOB, second["id"])
        assert "offset" in receipt  # recorded: a sender reconnecting later learns it too
    async with Api(daemon) as api:
        _, listed, _ = await api.get(f"/messages/?with={ALICE}", tenant=TENANT, user=BOB)
    assert [m["is_read"] for m in listed] == [True, True]


async def test_marking_read_over_rest_sends_a_receipt_to_the_open_room(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    room = dm_name(ALICE, BOB)
    async with Api(daemon) as api:
        _, sent, _ = await api.post(
            "/messages/send/", {"receiver_id": BOB, "content": "hello"}, tenant=TENANT, user=ALICE
        )
        async with connect(session, daemon, room, ALICE) as alice:
            await next_of_type(alice, "presence")
            status, body, _ = await api.post(
                "/messages/mark-as-read/", {"with": ALICE}, tenant=TENANT, user=BOB
            )
            assert (status, body) == (200, {"updated": 1})
            receipt = await next_of_type(alice, "read")
            assert (receipt["user_id"], receipt["up_to"]) == (BOB, sent["message_id"])


async def test_group_read_markers_only_move_forward(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    await create_room(daemon, ALICE, [BOB], name="g")
    async with connect(session, daemon, "g", ALICE) as alice:
        await next_of_type(alice, "presence")
        ids = []
        for text in ("a", "b"):
            await alice.send_json({"message": text})
            ids.append((await next_of_type(alice, "message"))["id"])
    async with connect(session, daemon, "g", BOB) as bob:
        await next_of_type(bob, "presence")
        await bob.send_json({"type": "read", "up_to": ids[1]})
        await next_of_type(bob, "read")
        await bob.send_json({"type": "read", "up_to": ids[0]})  # late, older: ignored
        await bob.send_json({"type": "ping"})
        await next_of_type(bob, "pong")
    async with Api(daemon) as api:
        _, room, _ = await api.get("/rooms/g/", tenant=TENANT, user=BOB)
    markers = {m["user_id"]: m["last_read_id"] for m in room["members"]}
    assert markers == {ALICE: None, BOB: ids[1]}


# --- limits and metrics ----------------------------------------------------------------------


async def test_a_connection_sending_faster_than_its_rate_is_refused_frames(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory(NOTIFYD_WS_MESSAGE_RATE="0.5", NOTIFYD_WS_MESSAGE_BURST="3")
    async with connect(session, daemon, dm_name(ALICE, BOB), ALICE) as alice:
        await next_of_type(alice, "presence")
        for _ in range(6):
            await alice.send_json({"type": "ping"})
        answers = [await next_json(alice) for _ in range(7)]  # her own join is one
    assert [a["type"] for a in answers].count("pong") == 3
    assert [a.get("code") for a in answers].count("rate_limited") == 3
    metrics = daemon.metrics.render().decode()
    assert "notifyd_ws_rate_limited_total 3.0" in metrics


async def test_chat_traffic_shows_in_the_metrics(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    async with connect(session, daemon, dm_name(ALICE, BOB), ALICE) as alice:
        await next_of_type(alice, "presence")
        assert 'notifyd_ws_connections{endpoint="chat"} 1.0' in daemon.metrics.render().decode()
        await alice.send_json({"message": "hi"})
        await next_of_type(alice, "message")
    metrics = daemon.metrics.render().decode()
    assert 'notifyd_ws_messages_in_total{endpoint="chat",type="message"} 1.0' in metrics
    assert "notifyd_ws_fanout_seconds_count 0.0" not in metrics

    async def closed_counted() -> bool:
        text = daemon.metrics.render().decode()
        return 'notifyd_ws_connections{endpoint="chat"} 0.0' in text

    await wait_for(closed_counted)


async def test_shutdown_closes_chat_sockets_with_going_away(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession
) -> None:
    daemon = await daemon_factory()
    async with connect(session, daemon, dm_name(ALICE, BOB), ALICE) as alice:
        await next_of_type(alice, "presence")
        stopping = asyncio.create_task(daemon.stop())
        assert await close_code(alice) == 1001
        await stopping  # and the daemon stops cleanly: no error is hidden here


async def test_every_stored_chat_message_has_its_audit_row(
    daemon: Daemon, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create_room(daemon, ALICE, [BOB], name="audited")
    async with (
        connect(session, daemon, "audited", ALICE) as alice,
        connect(session, daemon, dm_name(ALICE, BOB), ALICE) as direct,
    ):
        await next_of_type(alice, "presence")
        await next_of_type(direct, "presence")
        for n in range(5):
            await alice.send_json({"message": f"group {n}"})
            await direct.send_json({"message": f"dm {n}"})
        ids = {(await next_of_type(alice, "message"))["id"] for _ in range(5)}
        ids |= {(await next_of_type(direct, "message"))["id"] for _ in range(5)}
    rows = await db.fetch(
        "SELECT user_id, details FROM audit_log WHERE action = 'message.send' ORDER BY id"
    )
    details = [orjson.loads(r["details"]) for r in rows]
    assert {d["message_id"] for d in details} == ids
    assert {r["user_id"] for r in rows} == {ALICE}
    assert {d["via"] for d in details} == {"websocket"}
    assert await db.fetchval("SELECT count(*) FROM messages") == 10


async def test_messages_sent_at_once_are_stored_in_batches_of_at_most_the_setting(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """NOTIFYD_CHAT_WRITE_BATCH bounds how many messages share one statement. The rows of one
    statement share its transaction's `now()`, so each `sent_at` is one batch."""
    daemon = await daemon_factory(NOTIFYD_CHAT_WRITE_BATCH="4")
    senders = [f"sender-{i}" for i in range(12)]
    room = (await create_room(daemon, ALICE, senders, name="batched"))["name"]
    async with contextlib.AsyncExitStack() as stack:
        sockets = [
            await stack.enter_async_context(connect(session, daemon, room, u)) for u in senders
        ]
        for ws in sockets:
            await next_of_type(ws, "presence")
        async with db.transaction():
            # every write waits here, so all twelve are queued when the lock goes
            await db.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            for i, ws in enumerate(sockets):
                await ws.send_json({"message": f"m{i}"})

            async def queued() -> bool:
                waiting = await db.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                return bool(waiting >= 2)  # both writers blocked, the rest queued behind them

            await wait_for(queued, timeout=10)

            def all_submitted() -> bool:
                # a frame is counted and handed to the group commit in one step
                text = daemon.metrics.render().decode()
                return (
                    f'messages_in_total{{endpoint="chat",type="message"}} {len(senders)}.0' in text
                )

            await wait_for(all_submitted, timeout=10)
        for ws in sockets:
            seen = {(await next_of_type(ws, "message"))["message"] for _ in senders}
            assert seen == {f"m{i}" for i in range(12)}
    sizes = [
        row["n"] for row in await db.fetch("SELECT count(*) AS n FROM messages GROUP BY sent_at")
    ]
    assert sum(sizes) == 12
    assert max(sizes) == 4, sizes  # bounded by the setting, and the bound was reached


async def test_a_message_that_reads_like_a_removal_does_not_close_anyones_socket(
    daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    await create_room(daemon, ALICE, [BOB, CAROL], name="lookalike")
    text = '{"type":"member_removed","room":"lookalike","user_id":"carol"}'
    async with (
        connect(session, daemon, "lookalike", BOB) as bob,
        connect(session, daemon, "lookalike", CAROL) as carol,
    ):
        await next_of_type(bob, "presence")
        await next_of_type(carol, "presence")
        await bob.send_json({"message": text})
        assert (await next_of_type(carol, "message"))["message"] == text
        await carol.send_json({"type": "ping"})
        assert await next_of_type(carol, "pong") == {"type": "pong"}


def test_a_removal_signal_begins_with_the_prefix_sockets_watch_for_and_a_message_does_not() -> None:
    """Chat sockets look only at an event's first bytes for their removal (`REMOVAL_PREFIX`):
    the signal as `Chat.removed` publishes it must begin with them, as the hub hands it on
    (the `<ms>|` stamp stripped), and a message event, whatever its text, must not."""
    room = Room(TENANT, "panel", uuid.uuid4(), None)
    published = framed(dumps(removal_event(room, CAROL)))
    _, _, payload = published.partition(b"|")
    assert payload.startswith(REMOVAL_PREFIX)
    lookalike = ChatMessage(
        uuid.uuid4(), room, BOB, None, payload.decode(), datetime.now(UTC)
    ).event()
    assert not dumps(lookalike).startswith(REMOVAL_PREFIX)
    assert not dumps({"offset": "1-0", **lookalike}).startswith(REMOVAL_PREFIX)
