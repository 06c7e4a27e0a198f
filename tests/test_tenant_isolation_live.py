"""The promise "tenants never see each other", live: feeds, replay, rooms, presence, limits.

`test_tenant_isolation.py` checks rows; here the same user ids, DM pairs and room names exist
in two tenants at once, with sockets open in both, so only the tenant in every Redis key and
channel (`notifyd/keys.py`) keeps them apart: a live event, a replayed one, a read receipt, a
presence snapshot, a rate-limit bucket or a socket seat of tenant A must never reach or count
against tenant B. A guessed id of another tenant answers 404 and changes nothing, retry
included. Each test ends with a frame B *does* get, so "B saw nothing of A" is checked by
what B saw first, not by waiting for a silence.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from notifyd.app import Daemon
from notifyd.http.limits import SOCKETS_FULL
from notifyd.realtime.roomname import dm_name
from notifyd.requeue import RETRY_ACTION
from tests.conftest import DaemonFactory
from tests.helpers import Api, next_json, token, wait_for

TEN_A, TEN_B = "TEN-0001", "TEN-0002"
USER = "user-1"  # the same id in both tenants
ALICE, BOB = "auth0|alice", "auth0|bob"  # the same DM pair in both tenants
ROOM = "panel"  # the same group room name in both tenants


def feed(session: aiohttp.ClientSession, daemon: Daemon, tenant: str, user: str, **q: str) -> Any:
    """A notification socket of `user` in `tenant`."""
    query = "&".join(
        [f"token={token(daemon.settings, tenant, user)}"] + [f"{k}={v}" for k, v in q.items()]
    )
    url = f"ws://127.0.0.1:{daemon.port}/ws/notifications/{tenant}/{user}/?{query}"
    return session.ws_connect(url)


def chat(
    session: aiohttp.ClientSession, daemon: Daemon, tenant: str, room: str, user: str, **q: str
) -> Any:
    """A chat socket of `user` in `tenant`'s room `room`."""
    query = "&".join(
        [f"token={token(daemon.settings, tenant, user)}"] + [f"{k}={v}" for k, v in q.items()]
    )
    return session.ws_connect(f"ws://127.0.0.1:{daemon.port}/ws/chat/{room}/?{query}")


async def next_of(ws: aiohttp.ClientWebSocketResponse, *kinds: str) -> Any:
    """The next frame of one of `kinds` (others, such as joins, are skipped)."""
    while True:
        event = await next_json(ws)
        if event["type"] in kinds:
            return event


async def send_in_app(api: Api, tenant: str, user: str, message: str) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": user, "message": message},
        tenant=tenant,
        user="backend",
        role="service",
    )
    assert status == 202, body
    return str(body["notification_id"])


async def all_sent(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT bool_and(status = 'sent') FROM notifications"))


async def send_dm(api: Api, tenant: str, sender: str, receiver: str, content: str) -> str:
    status, body, _ = await api.post(
        "/messages/send/", {"receiver_id": receiver, "content": content}, tenant=tenant, user=sender
    )
    assert status == 201, body
    return str(body["message_id"])


# --- one user id in two tenants: the notification feed --------------------------------------


async def test_the_same_user_id_in_two_tenants_has_two_live_feeds_and_two_unread_counts(
    daemon: Daemon, api: Api, session: aiohttp.ClientSession
) -> None:
    async with (
        feed(session, daemon, TEN_A, USER) as in_a,
        feed(session, daemon, TEN_B, USER) as in_b,
    ):
        assert await next_json(in_a) == {"type": "unread_count", "count": 0}
        assert await next_json(in_b) == {"type": "unread_count", "count": 0}
        for_a = await send_in_app(api, TEN_A, USER, "A only")
        assert (await next_of(in_a, "notification"))["id"] == for_a
        for_b = await send_in_app(api, TEN_B, USER, "B only")
        got = await next_json(in_b)  # the first thing B hears is B's own
        assert (got["type"], got["id"]) == ("notification", for_b), got
        assert "A only" not in orjson.dumps(got).decode()

        # B reads everything: B's sockets learn the new count, A's count stays
        await in_b.send_str('{"type": "mark_read", "all": true}')
        assert await next_json(in_b) == {"type": "unread_count", "count": 0, "updated": 1}
        second = await send_in_app(api, TEN_A, USER, "A again")
        got = await next_json(in_a)  # not B's unread count: A's next frame is A's own
        assert (got["type"], got["id"]) == ("notification", second), got
    _, _, headers = await api.get("/notifications/", tenant=TEN_A, user=USER)
    assert headers["X-Unread-Count"] == "2"
    _, _, headers = await api.get("/notifications/", tenant=TEN_B, user=USER)
    assert headers["X-Unread-Count"] == "0"


async def test_a_replay_since_in_one_tenant_never_yields_another_tenants_events(
    daemon: Daemon, api: Api, session: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """`?since=` reads the user's history stream: B's replay from the very beginning holds
    B's events and none of A's, sent to the same user id before and after B's."""
    await send_in_app(api, TEN_A, USER, "A before")
    for_b = await send_in_app(api, TEN_B, USER, "B only")
    await send_in_app(api, TEN_A, USER, "A after")
    await wait_for(lambda: all_sent(db), timeout=15)
    async with feed(session, daemon, TEN_B, USER, since="0-0") as in_b:
        replayed = await next_json(in_b)
        assert (replayed["type"], replayed["id"]) == ("notification", for_b), replayed
        assert await next_json(in_b) == {"type": "unread_count", "count": 1}
    async with feed(session, daemon, TEN_A, USER, since="0-0") as in_a:
        got = [await next_of(in_a, "notification") for _ in range(2)]
        # (in the order they went live, which two separate sends do not fix)
        assert sorted(n["message"] for n in got) == ["A after", "A before"]
        assert (await next_json(in_a))["type"] == "unread_count"


# --- the same DM pair in two tenants ---------------------------------------------------------


async def test_the_same_dm_pair_in_two_tenants_keeps_messages_and_receipts_apart(
    daemon: Daemon, api: Api, session: aiohttp.ClientSession
) -> None:
    room = dm_name(ALICE, BOB)
    async with (
        chat(session, daemon, TEN_A, room, ALICE) as alice_a,
        chat(session, daemon, TEN_A, room, BOB) as bob_a,
        chat(session, daemon, TEN_B, room, ALICE) as alice_b,
        chat(session, daemon, TEN_B, room, BOB) as bob_b,
        feed(session, daemon, TEN_B, BOB) as bob_b_feed,
    ):
        for ws in (alice_a, bob_a, alice_b, bob_b):
            assert (await next_json(ws))["type"] == "presence"
        await next_of(bob_b_feed, "unread_count")
        in_a = await send_dm(api, TEN_A, ALICE, BOB, "A secret")
        assert (await next_of(bob_a, "message"))["id"] == in_a
        in_b = await send_dm(api, TEN_B, ALICE, BOB, "B hello")
        got = await next_of(bob_b, "message")  # B's first message is B's own
        assert (got["id"], got["message"], got["room"]) == (in_b, "B hello", room)
        notice = await next_of(bob_b_feed, "new_message")
        assert (notice["id"], notice["message"]) == (in_b, "B hello")

        # B's Bob reads B's conversation: only B's message, and only B's Alice is told
        status, body, _ = await api.post(
            "/messages/mark-as-read/", {"with": ALICE}, tenant=TEN_B, user=BOB
        )
        assert (status, body) == (200, {"updated": 1})
        receipt = await next_of(alice_b, "read")
        assert (receipt["user_id"], receipt["up_to"]) == (BOB, in_b)
        _, listed, _ = await api.get(f"/messages/?with={ALICE}", tenant=TEN_A, user=BOB)
        assert [(m["id"], m["is_read"]) for m in listed] == [(in_a, False)]
        await bob_a.send_json({"type": "read", "up_to": in_a})
        receipt = await next_of(alice_a, "read")  # A's first receipt is A's own
        assert (receipt["user_id"], receipt["up_to"]) == (BOB, in_a)
    for tenant, mine in ((TEN_A, "A secret"), (TEN_B, "B hello")):
        _, page, _ = await api.get(f"/rooms/{room}/messages/", tenant=tenant, user=BOB)
        assert [m["content"] for m in page] == [mine]
        _, listed, _ = await api.get("/messages/", tenant=tenant, user=ALICE)
        assert [m["content"] for m in listed] == [mine]
    # and the room's history: B's replay from the beginning is B's message and receipt
    async with chat(session, daemon, TEN_B, room, BOB, since="0-0") as bob_b:
        replayed = [await next_of(bob_b, "message", "read") for _ in range(2)]
        assert [(e["type"], e.get("id") or e.get("up_to")) for e in replayed] == [
            ("message", in_b),
            ("read", in_b),
        ]
        await bob_b.send_json({"type": "ping"})
        assert await next_of(bob_b, "pong", "message", "read") == {"type": "pong"}


# --- the same group room name in two tenants -------------------------------------------------


async def create_room(api: Api, tenant: str, owner: str, members: list[str]) -> None:
    status, body, _ = await api.post(
        "/rooms/", {"name": ROOM, "members": members}, tenant=tenant, user=owner
    )
    assert status == 201, body


async def test_group_rooms_of_the_same_name_in_two_tenants_are_two_rooms(
    daemon: Daemon, api: Api, session: aiohttp.ClientSession
) -> None:
    await create_room(api, TEN_A, ALICE, [BOB])
    await create_room(api, TEN_B, ALICE, [BOB])
    async with (
        chat(session, daemon, TEN_A, ROOM, ALICE) as alice_a,
        chat(session, daemon, TEN_B, ROOM, ALICE) as alice_b,
        chat(session, daemon, TEN_B, ROOM, BOB) as bob_b,
    ):
        for ws in (alice_a, alice_b, bob_b):
            await next_of(ws, "presence")
        await alice_a.send_json({"message": "A plan"})
        assert (await next_of(alice_a, "message"))["message"] == "A plan"
        await alice_b.send_json({"message": "B plan"})
        got = await next_of(bob_b, "message")
        assert (got["message"], got["sender_id"]) == ("B plan", ALICE), got
    for tenant, mine in ((TEN_A, "A plan"), (TEN_B, "B plan")):
        _, page, _ = await api.get(f"/rooms/{ROOM}/messages/", tenant=tenant, user=BOB)
        assert [m["content"] for m in page] == [mine]
    async with chat(session, daemon, TEN_B, ROOM, BOB, since="0-0") as bob_b:
        assert (await next_of(bob_b, "message"))["message"] == "B plan"
        await bob_b.send_json({"type": "ping"})
        assert await next_of(bob_b, "pong", "message") == {"type": "pong"}


async def test_presence_in_rooms_of_the_same_name_counts_each_tenants_own_members(
    daemon: Daemon, api: Api, session: aiohttp.ClientSession
) -> None:
    await create_room(api, TEN_A, ALICE, [BOB])
    await create_room(api, TEN_B, ALICE, [BOB])
    async with chat(session, daemon, TEN_A, ROOM, ALICE) as alice_a:
        assert (await next_json(alice_a))["online"] == [ALICE]
        assert (await next_of(alice_a, "join"))["user_id"] == ALICE
        async with chat(session, daemon, TEN_B, ROOM, BOB) as bob_b:
            assert (await next_json(bob_b))["online"] == [BOB]  # A's Alice is not in B's room
            assert (await next_of(bob_b, "join", "leave"))["user_id"] == BOB
        async with chat(session, daemon, TEN_A, ROOM, BOB) as bob_a:
            assert (await next_json(bob_a))["online"] == sorted([ALICE, BOB])
            # A's Alice hears A's Bob join, not B's Bob come and go
            event = await next_of(alice_a, "join", "leave")
            assert (event["type"], event["user_id"]) == ("join", BOB)


# --- cross-tenant retry ------------------------------------------------------------------------


async def test_a_retry_of_another_tenants_failed_notification_is_404_and_changes_nothing(
    daemon: Daemon, api: Api, db: asyncpg.Connection
) -> None:
    nid = await send_in_app(api, TEN_A, USER, "A only")
    await wait_for(lambda: all_sent(db), timeout=15)
    await db.execute(
        "UPDATE notifications SET status = 'failed', last_error = 'gave up' WHERE id = $1",
        uuid.UUID(nid),
    )
    before = dict(await db.fetchrow("SELECT * FROM notifications WHERE id = $1", uuid.UUID(nid)))
    for role in ("admin", "service", "user"):
        for path in (f"/notifications/{nid}/retry/", f"/api/notifications/{nid}/retry/"):
            status, problem, _ = await api.post(path, tenant=TEN_B, user="admin-1", role=role)
            assert (status, problem["status"]) == (404, 404), (role, problem)
            assert "failed" not in orjson.dumps(problem).decode()  # not even its state
    after = dict(await db.fetchrow("SELECT * FROM notifications WHERE id = $1", uuid.UUID(nid)))
    assert after == before
    assert await db.fetchval("SELECT count(*) FROM audit_log WHERE action = $1", RETRY_ACTION) == 0
    # A's own admin may: the row was a real failed delivery
    status, body, _ = await api.post(
        f"/notifications/{nid}/retry/", tenant=TEN_A, user="admin-1", role="admin"
    )
    assert (status, body["id"]) == (202, nid), body


# --- rate-limit buckets and socket seats -----------------------------------------------------


async def test_a_user_id_past_its_rate_in_one_tenant_still_sends_in_another(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(NOTIFYD_RATE_USER="0.01", NOTIFYD_RATE_USER_BURST="2")
    body = {"notification_type": "in_app", "recipient": "someone", "message": "hi"}
    async with Api(daemon) as api:
        in_a = [(await api.post("/notifications/send/", body, tenant=TEN_A))[0] for _ in range(3)]
        in_b = [(await api.post("/notifications/send/", body, tenant=TEN_B))[0] for _ in range(2)]
    assert (in_a, in_b) == ([202, 202, 429], [202, 202])


async def test_a_tenant_past_its_rate_leaves_another_tenants_rate_whole(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(NOTIFYD_RATE_TENANT="0.01", NOTIFYD_RATE_TENANT_BURST="2")
    body = {"notification_type": "in_app", "recipient": "someone", "message": "hi"}
    async with Api(daemon) as api:
        in_a = [
            (await api.post("/notifications/send/", body, tenant=TEN_A, user=f"u{n}"))[0]
            for n in range(3)
        ]
        in_b = [
            (await api.post("/notifications/send/", body, tenant=TEN_B, user=f"u{n}"))[0]
            for n in range(2)
        ]
    assert (in_a, in_b) == ([202, 202, 429], [202, 202])


async def test_a_tenant_past_its_daily_email_quota_leaves_another_tenants_quota_whole(
    daemon_factory: DaemonFactory,
) -> None:
    daemon = await daemon_factory(
        NOTIFYD_QUOTA_EMAIL_DAILY="1", EMAIL_HOST="127.0.0.1", EMAIL_PORT="9"
    )
    body = {
        "notification_type": "email",
        "recipient": "ann@example.com",
        "subject": "Hello",
        "message": "hi",
    }
    async with Api(daemon) as api:
        in_a = [
            (await api.post("/notifications/send/", body, tenant=TEN_A, role="service"))[0]
            for _ in range(2)
        ]
        in_b = [(await api.post("/notifications/send/", body, tenant=TEN_B, role="service"))[0]]
    assert (in_a, in_b) == ([202, 429], [202])


async def close_code_or_served(ws: aiohttp.ClientWebSocketResponse) -> int | str:
    """4029 (or another close code) when refused, "served" when the first frame came."""
    message = await ws.receive(timeout=10)
    if message.type == aiohttp.WSMsgType.TEXT:
        return "served"
    assert message.type == aiohttp.WSMsgType.CLOSE, message
    return int(message.data)


@pytest.mark.parametrize(
    ("cap", "b_user"),
    [
        pytest.param("NOTIFYD_WS_MAX_PER_USER", USER, id="per-user"),
        pytest.param("NOTIFYD_WS_MAX_PER_TENANT", "user-2", id="per-tenant"),
    ],
)
async def test_sockets_open_in_one_tenant_take_no_seat_of_another(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, cap: str, b_user: str
) -> None:
    daemon = await daemon_factory(**{cap: "1"})
    async with feed(session, daemon, TEN_A, USER) as first:
        assert await close_code_or_served(first) == "served"
        async with feed(session, daemon, TEN_A, USER) as second_in_a:
            assert await close_code_or_served(second_in_a) == SOCKETS_FULL  # the cap holds
        async with feed(session, daemon, TEN_B, b_user) as in_b:
            assert await close_code_or_served(in_b) == "served"
