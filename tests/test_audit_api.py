"""The audit log over REST: every write is recorded, and only the tenant's admins read it.

Promises checked: GET /audit/ (and /api/audit/) lists the tenant's rows newest first with who,
what, from where and when; filters by action and user; cursor pagination with a Link header;
`user` and `service` tokens are refused (403); another tenant's admin sees none of it.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from notifyd.http.context import Networks, forwarded_client
from notifyd.realtime.roomname import dm_name
from tests.conftest import DaemonFactory
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


FORWARDED = {"X-Forwarded-For": "10.9.9.9, 203.0.113.7"}  # what nginx sends: client's claim, peer


async def send_forwarded(api: Api) -> None:
    """A send whose request carries FORWARDED, as if it came through nginx."""
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-2", "message": "hi"},
        user="user-1",
        headers=FORWARDED,
    )
    assert status == 202, body


async def test_behind_a_trusted_proxy_the_forwarded_client_is_recorded(
    daemon_factory: DaemonFactory,
) -> None:
    """With nginx on the same host listed in NOTIFYD_TRUSTED_PROXIES, the audit log names the
    address nginx was reached from (the right-most hop it appended), not nginx, and not what
    the client wrote into the header itself (10.9.9.9)."""
    daemon = await daemon_factory(NOTIFYD_TRUSTED_PROXIES="127.0.0.1, ::1")
    async with Api(daemon) as api:
        await send_forwarded(api)
        status, body, _ = await api.post(  # a chain of trusted proxies: the first untrusted
            "/messages/send/",
            {"receiver_id": "user-1", "content": "hello"},
            user="user-2",
            headers={"X-Forwarded-For": "198.51.100.4, 127.0.0.1"},
        )
        assert status == 201, body
        rows = await audit(api)
    assert {r["action"]: r["ip_address"] for r in rows} == {
        "message.send": "198.51.100.4",
        "notification.send": "203.0.113.7",
    }


async def test_a_forwarded_header_from_an_untrusted_peer_is_ignored(api: Api) -> None:
    """No trusted proxies configured (the default): a client cannot choose its audited
    address by sending the header itself."""
    await send_forwarded(api)
    assert [r["ip_address"] for r in await audit(api)] == ["127.0.0.1"]


async def test_a_chat_message_over_a_proxied_websocket_records_the_client(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(NOTIFYD_TRUSTED_PROXIES="127.0.0.0/8")
    async with Api(daemon) as api:
        token = api.token(TENANT, "user-1")
    url = f"http://127.0.0.1:{daemon.port}/ws/chat/{dm_name('user-1', 'user-2')}/"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": f"Bearer {token}", **FORWARDED}) as ws,
    ):
        await ws.send_json({"message": "hello"})
        while (await ws.receive_json()).get("type") != "message":
            pass
    address = await db.fetchval("SELECT ip_address FROM audit_log WHERE action = 'message.send'")
    assert address == "203.0.113.7"


LOCAL = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "headers", "proxies", "client"),
    [
        ("127.0.0.1", ["10.9.9.9, 203.0.113.7"], (), "127.0.0.1"),  # no proxy trusted
        ("198.51.100.1", ["203.0.113.7"], LOCAL, "198.51.100.1"),  # peer is no proxy of ours
        ("127.0.0.1", [], LOCAL, "127.0.0.1"),  # a trusted peer that forwards nothing
        ("127.0.0.1", ["10.9.9.9, 203.0.113.7"], LOCAL, "203.0.113.7"),
        ("127.0.0.1", ["10.9.9.9", "203.0.113.7"], LOCAL, "203.0.113.7"),  # two headers: one list
        ("127.0.0.1", ["203.0.113.7, 127.0.0.1, ::1"], LOCAL, "203.0.113.7"),  # proxy chain
        ("127.0.0.1", ["127.0.0.1, ::1"], LOCAL, "127.0.0.1"),  # proxies all the way
        ("::ffff:127.0.0.1", ["203.0.113.7"], LOCAL, "203.0.113.7"),  # IPv4-mapped peer
        ("127.0.0.1", ["2001:DB8::0001"], LOCAL, "2001:db8::1"),  # canonical form
        ("127.0.0.1", ["fe80::1%eth0 evil"], LOCAL, "fe80::1"),  # no scope id, no free text
        ("127.0.0.1", ["203.0.113.7:4711"], LOCAL, "127.0.0.1"),  # not an address: the proxy
        ("127.0.0.1", ["junk, ::1"], LOCAL, "::1"),  # the last proxy that spoke
        ("127.0.0.1", [" , ,203.0.113.7,"], LOCAL, "203.0.113.7"),  # empty hops skipped
    ],
)
def test_the_client_behind_trusted_proxies(
    peer: str, headers: list[str], proxies: Networks, client: str
) -> None:
    assert forwarded_client(peer, headers, proxies) == client
