"""1-on-1 messages REST API: send, list (everything or one conversation), mark as read.

Promises checked here: a 201 means the message is in PostgreSQL; bad input gets a problem+json
422 naming the field and stores nothing; a caller sees only messages they sent or received and
marks only messages they received; every write leaves an audit row.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest
from yarl import URL

from tests.conftest import DaemonFactory
from tests.helpers import Api

TENANT = "TEN-0001"
PROBLEM = "application/problem+json"


def error_fields(body: Mapping[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


def next_link(headers: Mapping[str, str]) -> str | None:
    link = headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link.strip())
    assert match, link
    return URL(match.group(1)).path_qs


async def send(api: Api, sender: str, receiver: str, content: str = "hi") -> str:
    status, body, _ = await api.post(
        "/messages/send/", {"receiver_id": receiver, "content": content}, user=sender
    )
    assert status == 201, body
    return str(body["message_id"])


async def read_flags(db: asyncpg.Connection) -> dict[str, bool]:
    rows = await db.fetch("SELECT id, read_at FROM messages")
    return {str(r["id"]): r["read_at"] is not None for r in rows}


# ------------------------------------------------------------------------------------- send


@pytest.mark.parametrize("path", ["/messages/send/", "/api/messages/send/"])
async def test_send_answers_201_with_id_and_stores_the_message(
    api: Api, db: asyncpg.Connection, path: str
) -> None:
    status, body, _ = await api.post(
        path, {"receiver_id": "user-2", "content": "See you at 10"}, user="user-1"
    )
    assert status == 201, body
    mid = body["message_id"]
    assert uuid.UUID(mid).version == 7
    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(mid))
    assert row is not None
    assert (row["tenant_id"], row["sender_id"], row["receiver_id"], row["content"]) == (
        TENANT,
        "user-1",
        "user-2",
        "See you at 10",
    )
    assert row["read_at"] is None


async def test_content_over_the_configured_limit_is_rejected(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """NOTIFYD_MESSAGE_MAX_LENGTH bounds content: exactly the limit passes, one more is 422."""
    daemon = await daemon_factory(NOTIFYD_MESSAGE_MAX_LENGTH="10")
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/messages/send/", {"receiver_id": "user-2", "content": "x" * 10}
        )
        assert status == 201, body
        status, problem, headers = await api.post(
            "/messages/send/", {"receiver_id": "user-2", "content": "x" * 11}
        )
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert error_fields(problem) == {"content"}
    assert await db.fetchval("SELECT count(*) FROM messages") == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"receiver_id": "user-2", "content": ""}, "content", id="empty"),
        pytest.param({"receiver_id": "user-2", "content": "   "}, "content", id="blank"),
        pytest.param({"receiver_id": "user-2"}, "content", id="no-content"),
        pytest.param({"receiver_id": "user-2", "content": 5}, "content", id="content-int"),
        pytest.param({"receiver_id": "user-1", "content": "me"}, "receiver_id", id="self"),
        pytest.param({"content": "hi"}, "receiver_id", id="no-receiver"),
        pytest.param({"receiver_id": "a b", "content": "hi"}, "receiver_id", id="bad-receiver"),
        pytest.param(
            {"receiver_id": "user-2", "content": "hi", "sender_id": "user-9"},
            "sender_id",
            id="unknown-field",
        ),
    ],
)
async def test_send_rejects_bad_input_naming_the_field(
    api: Api, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    status, problem, headers = await api.post("/messages/send/", body, user="user-1")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert field in error_fields(problem), problem
    assert await db.fetchval("SELECT count(*) FROM messages") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0


# ------------------------------------------------------------------------------------- list


async def test_list_shows_sent_and_received_newest_first(api: Api) -> None:
    a = await send(api, "user-1", "user-2", "a")
    b = await send(api, "user-2", "user-1", "b")
    c = await send(api, "user-3", "user-1", "c")
    await send(api, "user-2", "user-3", "not mine")
    for path in ("/messages/", "/api/messages/"):
        status, body, _ = await api.get(path, user="user-1")
        assert status == 200, body
        assert isinstance(body, list)
        assert [m["id"] for m in body] == [c, b, a]
        assert [(m["sender_id"], m["receiver_id"]) for m in body] == [
            ("user-3", "user-1"),
            ("user-2", "user-1"),
            ("user-1", "user-2"),
        ]
        assert body[0]["content"] == "c"
        assert body[0]["is_read"] is False


async def test_with_gives_one_conversation_in_both_directions(api: Api) -> None:
    a = await send(api, "user-1", "user-2", "a")
    await send(api, "user-1", "user-3", "other conversation")
    b = await send(api, "user-2", "user-1", "b")
    await send(api, "user-2", "user-3", "not involving user-1")
    c = await send(api, "user-1", "user-2", "c")
    status, body, _ = await api.get("/messages/?with=user-2", user="user-1")
    assert status == 200, body
    assert [m["id"] for m in body] == [c, b, a]
    # the other side sees the same conversation
    _, theirs, _ = await api.get("/messages/?with=user-1", user="user-2")
    assert [m["id"] for m in theirs] == [c, b, a]
    # a third user asking about the pair sees only their own conversation with that user
    _, third, _ = await api.get("/messages/?with=user-1", user="user-3")
    assert [m["content"] for m in third] == ["other conversation"]


@pytest.mark.parametrize("query", ["", "?with=user-2"])
async def test_list_cursor_pagination_has_no_gap_or_overlap(api: Api, query: str) -> None:
    sent = []
    for i in range(7):
        sender, receiver = ("user-1", "user-2") if i % 2 else ("user-2", "user-1")
        sent.append(await send(api, sender, receiver, f"m{i}"))
    await send(api, "user-3", "user-2", "unrelated")
    path: str | None = f"/messages/{query}{'&' if query else '?'}limit=3"
    pages: list[list[str]] = []
    while path is not None:
        status, body, headers = await api.get(path, user="user-1")
        assert status == 200, body
        pages.append([m["id"] for m in body])
        path = next_link(headers)
        assert len(pages) <= 4, "pagination does not end"
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == sent[::-1]


@pytest.mark.parametrize(
    ("query", "field"),
    [("limit=0", "limit"), ("limit=x", "limit"), ("before=zzz", "before"), ("with=a%20b", "with")],
)
async def test_list_rejects_bad_query(api: Api, query: str, field: str) -> None:
    status, problem, headers = await api.get(f"/messages/?{query}")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert field in error_fields(problem)


# ---------------------------------------------------------------------------- mark as read


async def test_mark_ids_marks_only_messages_the_caller_received(
    api: Api, db: asyncpg.Connection
) -> None:
    received = await send(api, "user-2", "user-1", "to me")
    sent_by_me = await send(api, "user-1", "user-2", "from me")
    others = await send(api, "user-2", "user-3", "not mine")
    status, body, _ = await api.post(
        "/messages/mark-as-read/", {"ids": [received, sent_by_me, others]}, user="user-1"
    )
    assert (status, body) == (200, {"updated": 1})
    assert await read_flags(db) == {received: True, sent_by_me: False, others: False}
    _, listed, _ = await api.get("/messages/?with=user-2", user="user-1")
    assert {m["id"]: m["is_read"] for m in listed} == {received: True, sent_by_me: False}


async def test_mark_with_marks_one_senders_messages(api: Api, db: asyncpg.Connection) -> None:
    from_2 = [await send(api, "user-2", "user-1", f"m{i}") for i in range(2)]
    from_3 = await send(api, "user-3", "user-1", "three")
    to_2 = await send(api, "user-1", "user-2", "reply")
    status, body, _ = await api.post(
        "/api/messages/mark-as-read/", {"with": "user-2"}, user="user-1"
    )
    assert (status, body) == (200, {"updated": 2})
    assert await read_flags(db) == {from_2[0]: True, from_2[1]: True, from_3: False, to_2: False}


async def test_mark_all_marks_everything_received(api: Api, db: asyncpg.Connection) -> None:
    a = await send(api, "user-2", "user-1")
    b = await send(api, "user-3", "user-1")
    mine = await send(api, "user-1", "user-3")
    other = await send(api, "user-2", "user-3")
    status, body, _ = await api.post("/messages/mark-as-read/", {"all": True}, user="user-1")
    assert (status, body) == (200, {"updated": 2})
    assert await read_flags(db) == {a: True, b: True, mine: False, other: False}
    status, body, _ = await api.post("/messages/mark-as-read/", {"all": True}, user="user-1")
    assert body == {"updated": 0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "ids", id="none"),
        pytest.param({"all": True, "with": "user-2"}, "ids", id="two-selectors"),
        pytest.param({"ids": ["x"]}, "ids[0]", id="bad-id"),
        pytest.param({"with": "a b"}, "with", id="bad-with"),
        pytest.param({"all": True, "receiver_id": "user-2"}, "receiver_id", id="unknown"),
    ],
)
async def test_mark_rejects_bad_bodies(
    api: Api, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    mid = await send(api, "user-2", "user-1")
    status, problem, headers = await api.post("/messages/mark-as-read/", body, user="user-1")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert field in error_fields(problem), problem
    assert await read_flags(db) == {mid: False}


# ----------------------------------------------------------------------------------- audit


async def test_send_and_mark_read_write_audit_rows(api: Api, db: asyncpg.Connection) -> None:
    status, body, _ = await api.post(
        "/messages/send/",
        {"receiver_id": "user-2", "content": "hi"},
        user="user-1",
        headers={"X-Request-ID": "msg-send-1"},
    )
    assert status == 201
    mid = body["message_id"]
    status, _, _ = await api.post(
        "/messages/mark-as-read/",
        {"ids": [mid]},
        user="user-2",
        headers={"X-Request-ID": "msg-read-1"},
    )
    assert status == 200
    rows = await db.fetch("SELECT * FROM audit_log ORDER BY id")
    assert [
        (r["action"], r["tenant_id"], r["user_id"], r["request_id"], r["ip_address"]) for r in rows
    ] == [
        ("message.send", TENANT, "user-1", "msg-send-1", "127.0.0.1"),
        ("message.mark_read", TENANT, "user-2", "msg-read-1", "127.0.0.1"),
    ]
    assert json.loads(rows[0]["details"])["message_id"] == mid
    assert json.loads(rows[1]["details"])["updated"] == 1


async def test_group_room_messages_stay_out_of_one_on_one_lists(
    api: Api, db: asyncpg.Connection
) -> None:
    """Room messages have no receiver and are listed by room only; the 1-on-1 indexes leave
    them out (notifyd/sql/0007), and so must every 1-on-1 query, a conversation with oneself too."""
    status, room, _ = await api.post(
        "/rooms/", {"members": ["user-2"]}, tenant=TENANT, user="user-1"
    )
    assert status == 201, room
    room_id = await db.fetchval("SELECT id FROM rooms WHERE name = $1", room["name"])
    await db.execute(
        "INSERT INTO messages (id, tenant_id, sender_id, receiver_id, room_id, content) "
        "VALUES ($1, $2, 'user-1', NULL, $3, 'to the room')",
        uuid.uuid4(),
        TENANT,
        room_id,
    )
    mine = await send(api, "user-1", "user-2", "direct")
    for query in ("", "?with=user-2", "?with=user-1"):
        status, body, _ = await api.get(f"/messages/{query}", user="user-1")
        assert status == 200, body
        expected = [] if query == "?with=user-1" else [mine]
        assert [m["id"] for m in body] == expected, query
    _, unread, _ = await api.get("/messages/", user="user-2")
    assert [m["id"] for m in unread] == [mine]
