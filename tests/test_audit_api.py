"""The audit log over REST: every write is recorded, and only the tenant's admins read it.

Promises checked: GET /audit/ (and /api/audit/) lists the tenant's rows newest first with who,
what, from where and when; filters by action and user; cursor pagination with a Link header;
`user` and `service` tokens are refused (403); another tenant's admin sees none of it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.helpers import Api

TENANT = "TEN-0001"
ADMIN = "admin-1"
PROBLEM_JSON = "application/problem+json"


async def make_writes(api: Api, tenant: str = TENANT) -> None:
    """Three writes by three callers, in this order."""
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-2", "message": "hi"},
        tenant=tenant,
        user="user-1",
    )
    assert status == 202, body
    status, body, _ = await api.post(
        "/messages/send/",
        {"receiver_id": "user-1", "content": "hello"},
        tenant=tenant,
        user="user-2",
    )
    assert status == 201, body
    now = datetime.now(UTC)
    status, body, _ = await api.post(
        "/reminders/create/",
        {
            "application_id": "app-1",
            "candidate_id": "user-1",
            "employer_id": "user-2",
            "interview_time": (now + timedelta(days=2)).isoformat(),
            "reminder_time": (now + timedelta(days=1)).isoformat(),
        },
        tenant=tenant,
        user="svc",
        role="service",
    )
    assert status == 201, body


async def audit(api: Api, query: str = "", path: str = "/audit/") -> list[dict[str, Any]]:
    status, body, _ = await api.get(f"{path}{query}", user=ADMIN, role="admin")
    assert status == 200, body
    assert isinstance(body, list)
    return body


@pytest.mark.parametrize("path", ["/audit/", "/api/audit/"])
async def test_admin_sees_rows_newest_first(api: Api, path: str) -> None:
    await make_writes(api)
    rows = await audit(api, path=path)
    assert [(r["user_id"], r["action"]) for r in rows] == [
        ("svc", "reminder.create"),
        ("user-2", "message.send"),
        ("user-1", "notification.send"),
    ]
    for row in rows:
        assert row["ip_address"] == "127.0.0.1"
        assert isinstance(row["details"], dict) and row["details"]
        stamp = datetime.fromisoformat(row["timestamp"])
        assert stamp.tzinfo is not None
        assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)
    assert rows[1]["details"]["receiver_id"] == "user-1"
    assert rows[2]["details"]["recipient"] == "user-2"
    assert [r["timestamp"] for r in rows] == sorted((r["timestamp"] for r in rows), reverse=True)


async def test_filters_by_action_and_user(api: Api) -> None:
    await make_writes(api)
    await make_writes(api)
    by_action = await audit(api, "?action=message.send")
    assert [r["action"] for r in by_action] == ["message.send", "message.send"]
    by_user = await audit(api, "?user_id=user-1")
    assert [(r["user_id"], r["action"]) for r in by_user] == [("user-1", "notification.send")] * 2
    both = await audit(api, "?user_id=user-1&action=message.send")
    assert both == []
    assert await audit(api, "?action=no.such.action") == []


async def test_pagination_follows_link_header(api: Api) -> None:
    await make_writes(api)
    await make_writes(api)  # six rows
    seen: list[str] = []
    url = "/audit/?limit=4"
    pages = 0
    while url:
        status, body, headers = await api.get(url, user=ADMIN, role="admin")
        assert status == 200, body
        pages += 1
        seen += [r["id"] for r in body]
        link = headers.get("Link")
        if link is None:
            assert len(body) < 4
            break
        match = re.fullmatch(r'<(.+)>; rel="next"', link)
        assert match, link
        assert "limit=4" in match.group(1)
        url = match.group(1)
    assert pages == 2
    all_rows = await audit(api)
    assert seen == [r["id"] for r in all_rows]
    assert len(seen) == len(set(seen)) == 6


async def test_pagination_keeps_filters(api: Api) -> None:
    await make_writes(api)
    await make_writes(api)
    await make_writes(api)
    status, first, headers = await api.get(
        "/audit/?action=message.send&limit=2", user=ADMIN, role="admin"
    )
    assert status == 200
    assert len(first) == 2
    next_url = re.fullmatch(r'<(.+)>; rel="next"', headers["Link"])
    assert next_url
    status, second, _ = await api.get(next_url.group(1), user=ADMIN, role="admin")
    assert status == 200
    assert [r["action"] for r in second] == ["message.send"]
    assert second[0]["id"] not in {r["id"] for r in first}


@pytest.mark.parametrize("role", ["user", "service"])
async def test_user_and_service_may_not_read_audit(api: Api, role: str) -> None:
    await make_writes(api)
    for path in ("/audit/", "/api/audit/"):
        status, body, headers = await api.get(path, user="user-1", role=role)
        assert status == 403, body
        assert headers["Content-Type"].startswith(PROBLEM_JSON)
        assert body["status"] == 403


async def test_admin_sees_only_own_tenant(api: Api) -> None:
    await make_writes(api, tenant="TEN-0002")
    assert await audit(api) == []
    status, rows, _ = await api.get("/audit/", tenant="TEN-0002", user=ADMIN, role="admin")
    assert status == 200
    assert len(rows) == 3


@pytest.mark.parametrize(
    ("query", "field"),
    [("?limit=0", "limit"), ("?limit=abc", "limit"), ("?before=nope", "before")],
)
async def test_bad_query_is_422(api: Api, query: str, field: str) -> None:
    status, body, headers = await api.get(f"/audit/{query}", user=ADMIN, role="admin")
    assert status == 422, body
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    assert [e["field"] for e in body["errors"]] == [field]
