"""The promise "tenants never see each other".

The tenant comes from the verified token, never from the body or path; every query is scoped by
it; a guessed id of another tenant answers 404 and changes nothing. Tenant B here uses the very
same user id strings as tenant A, so only the tenant keeps them apart.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

from tests.helpers import Api

TEN_A = "TEN-0001"
TEN_B = "TEN-0002"
ROLES = ("user", "service", "admin")


def error_fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


def rfc3339(delta: timedelta) -> str:
    return (datetime.now(UTC) + delta).isoformat()


async def create_reminder(api: Api, tenant: str, candidate: str, employer: str) -> str:
    status, body, _ = await api.post(
        "/reminders/create/",
        {
            "application_id": "app-1",
            "candidate_id": candidate,
            "employer_id": employer,
            "interview_time": rfc3339(timedelta(days=2)),
            "reminder_time": rfc3339(timedelta(days=1)),
        },
        tenant=tenant,
        user="hiring-backend",
        role="service",
    )
    assert status == 201, body
    return str(body["reminder_id"])


# ----------------------------------------------------------------------------- notifications


async def test_tenant_b_cannot_list_fetch_or_mark_tenant_a_notifications(
    api: Api, db: asyncpg.Connection
) -> None:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-1", "message": "A only"},
        tenant=TEN_A,
        user="svc",
        role="service",
    )
    assert status == 202, body
    nid = body["notification_id"]

    for query in ("", "?unread=true", "?type=in_app", "?limit=1"):
        status, listed, headers = await api.get(f"/notifications/{query}", tenant=TEN_B)
        assert (status, listed) == (200, []), query
        assert headers["X-Unread-Count"] == "0"
    for role in ROLES:
        for path in (f"/notifications/{nid}/", f"/api/notifications/{nid}/"):
            status, problem, _ = await api.get(path, tenant=TEN_B, user="user-1", role=role)
            assert status == 404, (role, problem)
            assert "A only" not in json.dumps(problem)
    for body in ({"ids": [nid]}, {"all": True}):
        status, answer, _ = await api.post(
            "/api/notifications/mark-as-read/", body, tenant=TEN_B, user="user-1"
        )
        assert (status, answer) == (200, {"updated": 0, "unread_count": 0})
    assert (
        await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", uuid.UUID(nid)) is None
    )

    # tenant A's user still sees it, unread
    _, listed, headers = await api.get("/notifications/", tenant=TEN_A, user="user-1")
    assert [n["id"] for n in listed] == [nid]
    assert headers["X-Unread-Count"] == "1"


# ---------------------------------------------------------------------------------- messages


async def test_tenant_b_cannot_list_or_mark_tenant_a_messages(
    api: Api, db: asyncpg.Connection
) -> None:
    status, body, _ = await api.post(
        "/messages/send/",
        {"receiver_id": "user-2", "content": "A secret"},
        tenant=TEN_A,
        user="user-1",
    )
    assert status == 201, body
    mid = body["message_id"]

    for user, other in (("user-1", "user-2"), ("user-2", "user-1")):
        for query in ("", f"?with={other}"):
            status, listed, _ = await api.get(f"/messages/{query}", tenant=TEN_B, user=user)
            assert (status, listed) == (200, []), (user, query)
    for body in ({"ids": [mid]}, {"with": "user-1"}, {"all": True}):
        status, answer, _ = await api.post(
            "/messages/mark-as-read/", body, tenant=TEN_B, user="user-2"
        )
        assert (status, answer) == (200, {"updated": 0}), body
    assert await db.fetchval("SELECT read_at FROM messages WHERE id = $1", uuid.UUID(mid)) is None

    _, listed, _ = await api.get("/messages/?with=user-1", tenant=TEN_A, user="user-2")
    assert [m["id"] for m in listed] == [mid]


# --------------------------------------------------------------------------------- reminders


async def test_tenant_b_cannot_see_change_or_cancel_tenant_a_reminders(
    api: Api, db: asyncpg.Connection
) -> None:
    rid = await create_reminder(api, TEN_A, candidate="user-1", employer="user-2")
    before = dict(
        await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", uuid.UUID(rid))
    )

    for role in ROLES:
        for user in ("user-1", "user-2", "hiring-backend"):
            status, listed, _ = await api.get("/reminders/", tenant=TEN_B, user=user, role=role)
            assert (status, listed) == (200, []), (user, role)
            kw: dict[str, Any] = {"tenant": TEN_B, "user": user, "role": role}
            status, _, _ = await api.get(f"/reminders/{rid}/", **kw)
            assert status == 404, (user, role)
            status, _, _ = await api.request(
                "PATCH",
                f"/reminders/{rid}/",
                json={"reminder_time": rfc3339(timedelta(hours=3))},
                **kw,
            )
            assert status == 404, (user, role)
            status, _, _ = await api.request("DELETE", f"/api/reminders/{rid}/", **kw)
            assert status == 404, (user, role)

    after = dict(
        await db.fetchrow("SELECT * FROM interview_reminders WHERE id = $1", uuid.UUID(rid))
    )
    assert after == before
    # tenant A's candidate still sees it, scheduled
    _, listed, _ = await api.get("/reminders/", tenant=TEN_A, user="user-1")
    assert [(r["id"], r["status"]) for r in listed] == [(rid, "scheduled")]


# ------------------------------------------------------------------------------------- audit


async def test_tenant_b_admin_sees_none_of_tenant_a_audit_rows(api: Api) -> None:
    await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-1", "message": "A"},
        tenant=TEN_A,
    )
    await api.post("/messages/send/", {"receiver_id": "user-2", "content": "A"}, tenant=TEN_A)
    await create_reminder(api, TEN_A, candidate="user-1", employer="user-2")

    status, rows, _ = await api.get("/audit/", tenant=TEN_B, user="admin-1", role="admin")
    assert (status, rows) == (200, [])
    status, rows, _ = await api.get(
        "/api/audit/?action=notification.send", tenant=TEN_B, user="admin-1", role="admin"
    )
    assert (status, rows) == (200, [])

    # a write in B shows up for B's admin, alone
    await api.post("/messages/send/", {"receiver_id": "user-2", "content": "B"}, tenant=TEN_B)
    _, rows, _ = await api.get("/audit/", tenant=TEN_B, user="admin-1", role="admin")
    assert [r["action"] for r in rows] == ["message.send"]
    # and A's admin sees A's three writes only
    _, rows, _ = await api.get("/audit/", tenant=TEN_A, user="admin-1", role="admin")
    assert sorted(r["action"] for r in rows) == [
        "message.send",
        "notification.send",
        "reminder.create",
    ]


# ------------------------------------------------------------------------ tenant from token


@pytest.mark.parametrize(
    ("path", "body", "table"),
    [
        pytest.param(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": "user-1", "message": "x"},
            "notifications",
            id="notification",
        ),
        pytest.param(
            "/api/messages/send/", {"receiver_id": "user-2", "content": "x"}, "messages", id="msg"
        ),
        pytest.param(
            "/reminders/create/",
            {
                "application_id": "app-1",
                "candidate_id": "user-1",
                "employer_id": "user-2",
                "interview_time": "2999-01-01T10:00:00Z",
                "reminder_time": "2999-01-01T09:00:00+00:00",
            },
            "interview_reminders",
            id="reminder",
        ),
    ],
)
async def test_body_cannot_choose_the_tenant(
    api: Api, db: asyncpg.Connection, path: str, body: dict[str, Any], table: str
) -> None:
    """A `tenant_id` in the body is an unknown field: 422 naming it, and nothing is created."""
    status, problem, headers = await api.post(
        path, {**body, "tenant_id": TEN_A}, tenant=TEN_B, role="service"
    )
    assert status == 422, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert "tenant_id" in error_fields(problem)
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0


# ------------------------------------------------------------------------------ opaque ids


@pytest.mark.parametrize(
    "tenant", ["TEN-0001", "auth0|tenant", "9d2b6c44-71e0-4f38-b5aa-3e8c0f19d7a2"]
)
async def test_opaque_tenant_and_user_ids_work_end_to_end(
    api: Api, db: asyncpg.Connection, tenant: str
) -> None:
    """`auth0|42`, `TEN-0001` and UUIDs are all just opaque ids: send, list, fetch, mark,
    message, converse and remind all work, scoped to the token's tenant."""
    user = "auth0|42"
    peer = "google-oauth2|1234567890"
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": user, "message": "hi"},
        tenant=tenant,
        user="svc:hiring",
        role="service",
    )
    assert status == 202, body
    nid = body["notification_id"]
    row = await db.fetchrow("SELECT tenant_id, user_id FROM notifications")
    assert tuple(row) == (tenant, user)

    status, listed, headers = await api.get("/notifications/", tenant=tenant, user=user)
    assert status == 200
    assert [n["id"] for n in listed] == [nid]
    assert headers["X-Unread-Count"] == "1"
    status, one, _ = await api.get(f"/notifications/{nid}/", tenant=tenant, user=user)
    assert (status, one["user_id"], one["tenant_id"]) == (200, user, tenant)
    status, answer, _ = await api.post(
        "/notifications/mark-as-read/", {"ids": [nid]}, tenant=tenant, user=user
    )
    assert (status, answer) == (200, {"updated": 1, "unread_count": 0})

    status, body, _ = await api.post(
        "/messages/send/", {"receiver_id": peer, "content": "hello"}, tenant=tenant, user=user
    )
    assert status == 201, body
    status, convo, _ = await api.get(
        f"/messages/?with={quote(user, safe='')}", tenant=tenant, user=peer
    )
    assert status == 200, convo
    assert [(m["sender_id"], m["receiver_id"]) for m in convo] == [(user, peer)]
    status, answer, _ = await api.post(
        "/messages/mark-as-read/", {"with": user}, tenant=tenant, user=peer
    )
    assert (status, answer) == (200, {"updated": 1})

    rid = await create_reminder(api, tenant, candidate=user, employer=peer)
    status, listed, _ = await api.get("/reminders/", tenant=tenant, user=user)
    assert (status, [r["id"] for r in listed]) == (200, [rid])

    # the same user id in another tenant sees none of it
    other = "TEN-OTHER"
    _, listed, _ = await api.get("/notifications/", tenant=other, user=user)
    assert listed == []
    _, listed, _ = await api.get("/messages/", tenant=other, user=peer)
    assert listed == []
    _, listed, _ = await api.get("/reminders/", tenant=other, user=user)
    assert listed == []


async def test_idempotency_key_is_scoped_to_the_tenant(api: Api, db: asyncpg.Connection) -> None:
    """The same Idempotency-Key and user id in another tenant is a new request, never a replay
    of tenant A's answer."""
    body = {"notification_type": "in_app", "recipient": "user-2", "message": "x"}
    key = {"Idempotency-Key": "same-key-1"}
    status_a, answer_a, _ = await api.post(
        "/notifications/send/", body, tenant=TEN_A, user="user-1", headers=key
    )
    status_b, answer_b, headers_b = await api.post(
        "/notifications/send/", body, tenant=TEN_B, user="user-1", headers=key
    )
    assert (status_a, status_b) == (202, 202), (answer_a, answer_b)
    assert answer_a["notification_id"] != answer_b["notification_id"]
    assert "Idempotent-Replayed" not in headers_b
    rows = await db.fetch("SELECT id, tenant_id FROM notifications ORDER BY id")
    assert [(str(r["id"]), r["tenant_id"]) for r in rows] == [
        (answer_a["notification_id"], TEN_A),
        (answer_b["notification_id"], TEN_B),
    ]
    # a replay within B answers B's own notification
    status, replay, _ = await api.post(
        "/notifications/send/", body, tenant=TEN_B, user="user-1", headers=key
    )
    assert (status, replay) == (202, answer_b)
