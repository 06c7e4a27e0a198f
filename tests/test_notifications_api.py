"""Notifications REST API: send (every channel), the notification center, one notification,
mark-as-read, and the audit row each write leaves.

Promises checked here: a 2xx means the row is in PostgreSQL (and its intent on the stream,
or left for the sweeper when Redis is down); bad input gets a problem+json 422 naming the field
and changes nothing; the caller only ever sees and marks their own notifications.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from yarl import URL

from notifyd.app import Daemon
from notifyd.keys import Keys
from notifyd.payloads import NotificationIntent
from scripts.localservers import RedisServer
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for

# accepted: stored and on its way (the pipeline moves it on while the test looks)
# any state the pipeline may already have moved the row to by the time the test reads it
# (without a Twilio account an SMS fails at once, and the pipeline can win that race)
ACCEPTED_STATES = {"queued", "dispatched", "sending", "sent", "retrying", "failed"}
TENANT = "TEN-0001"
PROBLEM = "application/problem+json"


def error_fields(body: Mapping[str, Any]) -> set[str]:
    """The field names a problem+json body blames."""
    return {e["field"] for e in body.get("errors", [])}


def next_link(headers: Mapping[str, str]) -> str | None:
    """The path and query of a `Link: <...>; rel="next"` header, or None."""
    link = headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>;\s*rel="next"', link.strip())
    assert match, link
    return URL(match.group(1)).path_qs


async def send_in_app(
    api: Api, recipient: str, message: str = "hello", *, user: str = "svc", role: str = "service"
) -> str:
    status, body, _ = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": recipient, "message": message},
        user=user,
        role=role,
    )
    assert status == 202, body
    return str(body["notification_id"])


async def intents(daemon: Daemon) -> list[NotificationIntent]:
    client = Redis.from_url(daemon.settings.effective_redis_url)
    try:
        entries = await client.xrange("notifyd:intents")
    finally:
        await client.aclose()
    return [NotificationIntent.from_fields(fields) for _, fields in entries]


async def moved_on(db: asyncpg.Connection, nid: str, to: set[str]) -> None:
    """Waits until the row's status is one of `to`."""

    async def there() -> bool:
        status = await db.fetchval("SELECT status FROM notifications WHERE id = $1", uuid.UUID(nid))
        return status in to

    await wait_for(there, timeout=10)


async def notification_count(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM notifications"))


# ------------------------------------------------------------------------------------- send


@pytest.mark.parametrize("path", ["/notifications/send/", "/api/notifications/send/"])
@pytest.mark.parametrize("role", ["user", "service"])
async def test_send_in_app_is_accepted_stored_and_dispatched_by_the_accepting_process(
    api: Api, daemon: Daemon, db: asyncpg.Connection, path: str, role: str
) -> None:
    """202 {notification_id, status: queued} + Location; the row is in PostgreSQL, and the
    process that accepted it dispatches it itself: delivered, with nothing on
    `notifyd:intents` (the stream carries what other producers and the sweeper enqueue)."""
    status, body, headers = await api.post(
        path,
        {"notification_type": "in_app", "recipient": "user-2", "message": "Hi", "subject": "S"},
        user="user-1",
        role=role,
    )
    assert status == 202, body
    assert set(body) == {"notification_id", "status"}
    assert body["status"] == "queued"
    nid = body["notification_id"]
    assert uuid.UUID(nid).version == 7
    assert headers["Location"] == f"/notifications/{nid}/"

    row = await db.fetchrow("SELECT * FROM notifications WHERE id = $1", uuid.UUID(nid))
    assert row is not None
    assert row["status"] in ACCEPTED_STATES
    assert row["tenant_id"] == TENANT
    assert row["channel"] == "in_app"
    assert row["recipient"] == "user-2"
    assert row["user_id"] == "user-2"
    assert row["created_by"] == "user-1"
    assert (row["subject"], row["body"]) == ("S", "Hi")

    await moved_on(db, nid, to={"sent"})
    assert await intents(daemon) == []


@pytest.mark.parametrize(
    ("channel", "recipient"),
    [("email", "ann@example.com"), ("sms", "+14155550123"), ("sms", "+44 20 7946 0958")],
)
async def test_service_sends_email_and_sms(
    api: Api, daemon: Daemon, db: asyncpg.Connection, channel: str, recipient: str
) -> None:
    """A service token may send any channel; the row is stored (phone numbers in E.164) and
    dispatched by the accepting process onto its channel's delivery stream."""
    payload = {"notification_type": channel, "recipient": recipient, "message": "Interview at 10"}
    if channel == "email":
        payload["subject"] = "Interview"
    status, body, _ = await api.post(
        "/notifications/send/", payload, user="hiring-backend", role="service"
    )
    assert status == 202, body
    row = await db.fetchrow(
        "SELECT * FROM notifications WHERE id = $1", uuid.UUID(body["notification_id"])
    )
    assert row is not None
    stored = recipient if channel == "email" else "+" + "".join(c for c in recipient if c.isdigit())
    assert (row["channel"], row["recipient"]) == (channel, stored)
    assert row["status"] in ACCEPTED_STATES
    await moved_on(db, body["notification_id"], to=ACCEPTED_STATES - {"queued"})
    assert await intents(daemon) == []


@pytest.mark.parametrize(
    ("channel", "recipient"), [("email", "ann@example.com"), ("sms", "+14155550123")]
)
async def test_user_may_not_send_email_or_sms_by_default(
    api: Api, daemon: Daemon, db: asyncpg.Connection, channel: str, recipient: str
) -> None:
    """The default send policy lets a plain user send in_app only: 403 problem+json, nothing
    stored, nothing enqueued."""
    status, body, headers = await api.post(
        "/notifications/send/",
        {"notification_type": channel, "recipient": recipient, "message": "x"},
        user="user-1",
        role="user",
    )
    assert status == 403, body
    assert headers["Content-Type"].startswith(PROBLEM)
    assert body["status"] == 403
    assert await notification_count(db) == 0
    assert await intents(daemon) == []


async def test_send_policy_setting_lets_users_send_email_and_sms(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """NOTIFYD_SEND_POLICY restores the first seed's "any bearer sends email and SMS"."""
    daemon = await daemon_factory(NOTIFYD_SEND_POLICY="user=email,sms,in_app")
    async with Api(daemon) as api:
        for channel, recipient in (("email", "ann@example.com"), ("sms", "+14155550123")):
            status, body, _ = await api.post(
                "/notifications/send/",
                {
                    "notification_type": channel,
                    "recipient": recipient,
                    "message": "x",
                    "subject": "s",
                },
                user="user-1",
            )
            assert status == 202, body
    assert await notification_count(db) == 2


async def test_send_with_template_key_and_context(api: Api, db: asyncpg.Connection) -> None:
    """template_key + context replace subject/message: rendered at accept time (the built-in
    interview_reminder here), key and context kept on the row."""
    context = {"Candidate Name": "Ann", "interview_time": "10:00"}
    status, body, _ = await api.post(
        "/notifications/send/",
        {
            "notification_type": "email",
            "recipient": "ann@example.com",
            "template_key": "interview_reminder",
            "context": context,
        },
        role="service",
    )
    assert status == 202, body
    row = await db.fetchrow(
        "SELECT * FROM notifications WHERE id = $1", uuid.UUID(body["notification_id"])
    )
    assert row is not None
    assert row["template_key"] == "interview_reminder"
    assert "Ann" in row["body"]
    assert "10:00" in row["subject"]
    assert json.loads(row["context"]) == context


GOOD = {"notification_type": "in_app", "recipient": "user-2", "message": "hi"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param(
            {"notification_type": "email", "recipient": "not-an-email", "message": "x"},
            "recipient",
            id="bad-email",
        ),
        pytest.param(
            {"notification_type": "email", "recipient": "a@b.com\r\nBcc: c@d.com", "message": "x"},
            "recipient",
            id="email-header-injection",
        ),
        pytest.param(
            {"notification_type": "sms", "recipient": "call me", "message": "x"},
            "recipient",
            id="bad-phone",
        ),
        pytest.param(
            {"notification_type": "in_app", "recipient": "user/2", "message": "x"},
            "recipient",
            id="bad-user-id",
        ),
        pytest.param(
            {"notification_type": "in_app", "recipient": "user-2"},
            "message",
            id="no-message-nor-template",
        ),
        pytest.param({**GOOD, "colour": "red"}, "colour", id="unknown-field"),
        pytest.param({**GOOD, "notification_type": 5}, "notification_type", id="type-int"),
        pytest.param({**GOOD, "notification_type": "fax"}, "notification_type", id="type-fax"),
        pytest.param({**GOOD, "recipient": ["user-2"]}, "recipient", id="recipient-list"),
        pytest.param({**GOOD, "subject": "a\r\nBcc: x@y.z"}, "subject", id="subject-newline"),
        pytest.param({**GOOD, "subject": "s" * 501}, "subject", id="subject-too-long"),
        pytest.param({**GOOD, "context": {"a": 1}}, "context", id="context-without-template"),
        pytest.param({**GOOD, "message": 7}, "message", id="message-int"),
        pytest.param(
            {k: v for k, v in GOOD.items() if k != "recipient"}, "recipient", id="no-recipient"
        ),
    ],
)
async def test_send_rejects_bad_input_naming_the_field(
    api: Api, daemon: Daemon, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    """Bad input: 422 problem+json whose errors[].field names the culprit; nothing stored or
    enqueued."""
    status, problem, headers = await api.post("/notifications/send/", body, role="service")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert problem["status"] == 422
    assert field in error_fields(problem), problem
    assert await notification_count(db) == 0
    assert await db.fetchval("SELECT count(*) FROM audit_log") == 0
    assert await intents(daemon) == []


async def test_send_reports_every_bad_field_at_once(api: Api) -> None:
    """All problems come back in one 422, so a client fixes its request in one round trip."""
    status, problem, _ = await api.post(
        "/notifications/send/",
        {"notification_type": 5, "recipient": ["x"], "subject": "a\nb", "extra": 1},
        role="service",
    )
    assert status == 422
    assert {"notification_type", "recipient", "subject", "extra"} <= error_fields(problem)


async def test_send_answers_202_while_redis_is_down_and_delivers_once_it_is_back(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Nothing accepted is lost: with Redis unreachable the row is committed and the answer is
    still 202. The dispatch that follows in the background cannot publish or enqueue; it
    counts the failure and leaves the row for the sweeper (`queued`, or `dispatched` if the
    UPDATE came before the failed XADD: the sweeper takes both). Redis then comes back empty
    (it had no persistence): the sweeper puts the row on the stream after
    NOTIFYD_REQUEUE_AFTER and it is delivered, its live event on the user's feed."""
    own_redis = RedisServer(tmp_path / "redis", persistent=False)
    own_redis.start()
    try:
        daemon = await daemon_factory(
            REDIS_URL=own_redis.url(0),
            NOTIFYD_REQUEUE_AFTER="1",
            NOTIFYD_SWEEP_INTERVAL="0.2",
            NOTIFYD_CLAIM_IDLE="2",
            NOTIFYD_SEND_TIMEOUT="1",
            # actors crash while Redis is away: back soon after it is, within the budget
            NOTIFYD_ACTOR_BACKOFF_CAP="1",
        )
        own_redis.kill()
        async with Api(daemon) as api:
            status, body, _ = await api.post(
                "/notifications/send/",
                {"notification_type": "in_app", "recipient": "user-2", "message": "hi"},
            )
            assert status == 202, body
            assert body["status"] == "queued"

            async def failure_counted() -> bool:
                _, metrics, _ = await api.get("/metrics", auth=False)
                return "notifyd_enqueue_failures_total 1.0" in metrics

            await wait_for(failure_counted, timeout=10)
        notification_id = uuid.UUID(body["notification_id"])
        row = await db.fetchrow("SELECT status FROM notifications WHERE id = $1", notification_id)
        assert row is not None
        assert row["status"] in ("queued", "dispatched")

        own_redis.start()  # same port, nothing in it

        async def sent() -> bool:
            status = await db.fetchval(
                "SELECT status FROM notifications WHERE id = $1", notification_id
            )
            return bool(status == "sent")

        await wait_for(sent, timeout=15, interval=0.1)
        offset = await db.fetchval(
            "SELECT provider_message_id FROM notifications WHERE id = $1", notification_id
        )
        redis = Redis.from_url(own_redis.url(0))
        try:
            feed: Any = await redis.xrange(
                Keys(daemon.settings.redis_prefix).user_history(TENANT, "user-2")
            )
        finally:
            await redis.aclose()
        assert [entry_id.decode() for entry_id, _ in feed] == [offset]
        assert str(notification_id).encode() in b"".join(feed[0][1].values())
        await daemon.stop()  # before its Redis goes away
    finally:
        own_redis.stop()


# ------------------------------------------------------------------------------------- list


async def test_list_is_newest_first_json_array_of_own_notifications(api: Api) -> None:
    """GET /notifications/ (and /api/...) is a JSON array of the caller's own, newest first."""
    sent = [await send_in_app(api, "user-1", f"m{i}") for i in range(3)]
    await send_in_app(api, "user-2", "not yours")
    for path in ("/notifications/", "/api/notifications/"):
        status, body, headers = await api.get(path, user="user-1")
        assert status == 200, body
        assert isinstance(body, list)
        assert [n["id"] for n in body] == sent[::-1]
        assert [n["message"] for n in body] == ["m2", "m1", "m0"]
        assert all(n["notification_type"] == "in_app" for n in body)
        assert headers["X-Unread-Count"] == "3"


async def test_list_filters_unread_and_type(api: Api) -> None:
    """`unread=true` hides read ones; `type=` keeps one channel."""
    first = await send_in_app(api, "user-1", "a")
    second = await send_in_app(api, "user-1", "b")
    status, body, _ = await api.post(
        "/notifications/send/",
        {
            "notification_type": "email",
            "recipient": "u1@example.com",
            "user_id": "user-1",
            "message": "mail",
            "subject": "mail",
        },
        role="service",
    )
    assert status == 202, body
    email_id = body["notification_id"]
    status, body, _ = await api.post(
        "/notifications/mark-as-read/", {"ids": [first]}, user="user-1"
    )
    assert (status, body) == (200, {"updated": 1, "unread_count": 1})

    _, unread, headers = await api.get("/notifications/?unread=true", user="user-1")
    assert [n["id"] for n in unread] == [second]
    assert headers["X-Unread-Count"] == "1"
    _, in_app, _ = await api.get("/notifications/?type=in_app", user="user-1")
    assert [n["id"] for n in in_app] == [second, first]
    _, email, _ = await api.get("/notifications/?type=email", user="user-1")
    assert [n["id"] for n in email] == [email_id]
    _, everything, _ = await api.get("/notifications/", user="user-1")
    assert [n["id"] for n in everything] == [email_id, second, first]


async def test_list_cursor_pagination_follows_link_without_gap_or_overlap(api: Api) -> None:
    """7 notifications, limit 3: following `Link: rel="next"` gives 3 + 3 + 1, in order."""
    sent = [await send_in_app(api, "user-1", f"m{i}") for i in range(7)]
    pages: list[list[str]] = []
    path: str | None = "/notifications/?limit=3"
    while path is not None:
        status, body, headers = await api.get(path, user="user-1")
        assert status == 200, body
        pages.append([n["id"] for n in body])
        path = next_link(headers)
        assert len(pages) <= 4, "pagination does not end"
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for page in pages for i in page] == sent[::-1]


async def test_list_pagination_keeps_filters_in_the_next_link(api: Api) -> None:
    """The next link carries the filters, so page two is still unread-only."""
    sent = [await send_in_app(api, "user-1", f"m{i}") for i in range(5)]
    await api.post("/notifications/mark-as-read/", {"ids": [sent[1]]}, user="user-1")
    status, page1, headers = await api.get("/notifications/?unread=true&limit=2", user="user-1")
    assert status == 200
    link = next_link(headers)
    assert link is not None
    _, page2, _ = await api.get(link, user="user-1")
    assert [n["id"] for n in page1 + page2] == [sent[4], sent[3], sent[2], sent[0]]


@pytest.mark.parametrize("limit", ["0", "10000", "x", "-1"])
async def test_list_rejects_bad_limit(api: Api, limit: str) -> None:
    status, problem, headers = await api.get(f"/notifications/?limit={limit}")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert "limit" in error_fields(problem)


async def test_list_rejects_bad_cursor_and_type(api: Api) -> None:
    status, problem, _ = await api.get("/notifications/?before=nope&type=fax")
    assert status == 422
    assert {"before", "type"} <= error_fields(problem)


# --------------------------------------------------------------------------------- get one


async def test_get_one_visible_to_recipient_creator_service_and_admin(api: Api) -> None:
    """Recipient, creator and the tenant's service/admin see it, with its delivery status."""
    nid = await send_in_app(api, "user-2", "hi", user="user-1", role="user")
    for user, role in (("user-2", "user"), ("user-1", "user"), ("svc", "service"), ("a", "admin")):
        status, body, _ = await api.get(f"/notifications/{nid}/", user=user, role=role)
        assert status == 200, (user, role, body)
        assert body["id"] == nid
        assert body["status"] in ACCEPTED_STATES
        assert body["recipient"] == "user-2"
        assert body["created_by"] == "user-1"
    status, body, _ = await api.get(f"/api/notifications/{nid}/", user="user-2")
    assert status == 200


async def test_get_one_hidden_from_another_user_of_the_tenant(api: Api) -> None:
    nid = await send_in_app(api, "user-2", "private", user="user-1", role="user")
    status, problem, headers = await api.get(f"/notifications/{nid}/", user="user-3")
    assert status == 404, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert "private" not in json.dumps(problem)


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "5f0c8e1a-2b7d-4c3e-9a61-0d4f7b2e8c15"])
async def test_get_one_unknown_or_malformed_id_is_404(api: Api, bad_id: str) -> None:
    status, problem, headers = await api.get(f"/notifications/{bad_id}/", role="admin")
    assert status == 404, problem
    assert headers["Content-Type"].startswith(PROBLEM)


# ---------------------------------------------------------------------------- mark as read


@pytest.mark.parametrize(
    "path", ["/notifications/mark-as-read/", "/api/notifications/mark-as-read/"]
)
async def test_mark_ids_touches_only_the_callers_own(
    api: Api, db: asyncpg.Connection, path: str
) -> None:
    """Ids of another user's notifications are ignored: not counted, not changed."""
    mine = [await send_in_app(api, "user-1", f"m{i}") for i in range(3)]
    theirs = await send_in_app(api, "user-2", "theirs")
    status, body, _ = await api.post(path, {"ids": [mine[0], mine[1], theirs]}, user="user-1")
    assert status == 200, body
    assert body == {"updated": 2, "unread_count": 1}
    read = {
        str(r["id"]): r["read_at"] is not None
        for r in await db.fetch("SELECT id, read_at FROM notifications")
    }
    assert read == {mine[0]: True, mine[1]: True, mine[2]: False, theirs: False}
    # marking again changes nothing
    status, body, _ = await api.post(path, {"ids": [mine[0]]}, user="user-1")
    assert body == {"updated": 0, "unread_count": 1}


async def test_mark_all_marks_every_own_unread(api: Api, db: asyncpg.Connection) -> None:
    for i in range(3):
        await send_in_app(api, "user-1", f"m{i}")
    theirs = await send_in_app(api, "user-2", "theirs")
    status, body, _ = await api.post(
        "/api/notifications/mark-as-read/", {"all": True}, user="user-1"
    )
    assert (status, body) == (200, {"updated": 3, "unread_count": 0})
    _, _, headers = await api.get("/notifications/", user="user-1")
    assert headers["X-Unread-Count"] == "0"
    other = await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", uuid.UUID(theirs))
    assert other is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "ids", id="neither"),
        pytest.param({"all": False}, "ids", id="all-false"),
        pytest.param({"ids": [], "all": True}, "all", id="both"),
        pytest.param({"ids": ["nope"]}, "ids[0]", id="bad-id"),
        pytest.param({"ids": "x"}, "ids", id="ids-not-list"),
        pytest.param({"all": True, "user_id": "user-2"}, "user_id", id="unknown-field"),
    ],
)
async def test_mark_rejects_bad_bodies(
    api: Api, db: asyncpg.Connection, body: dict[str, Any], field: str
) -> None:
    nid = await send_in_app(api, "user-1")
    status, problem, headers = await api.post("/notifications/mark-as-read/", body, user="user-1")
    assert status == 422, problem
    assert headers["Content-Type"].startswith(PROBLEM)
    assert field in error_fields(problem), problem
    assert (
        await db.fetchval("SELECT read_at FROM notifications WHERE id = $1", uuid.UUID(nid)) is None
    )


# ----------------------------------------------------------------------------------- audit


async def test_every_write_adds_an_audit_row(api: Api, db: asyncpg.Connection) -> None:
    """notification.send and notification.mark_read rows carry user, tenant, IP, request id."""
    status, body, headers = await api.post(
        "/notifications/send/",
        {"notification_type": "in_app", "recipient": "user-2", "message": "hi"},
        user="user-1",
        headers={"X-Request-ID": "req-send-1"},
    )
    assert status == 202
    assert headers["X-Request-ID"] == "req-send-1"
    nid = body["notification_id"]
    status, _, _ = await api.post(
        "/notifications/mark-as-read/",
        {"ids": [nid]},
        user="user-2",
        headers={"X-Request-ID": "req-read-1"},
    )
    assert status == 200
    rows = await db.fetch("SELECT * FROM audit_log ORDER BY id")
    assert [r["action"] for r in rows] == ["notification.send", "notification.mark_read"]
    send, read = rows
    assert (send["tenant_id"], send["user_id"], send["request_id"]) == (
        TENANT,
        "user-1",
        "req-send-1",
    )
    assert (read["tenant_id"], read["user_id"], read["request_id"]) == (
        TENANT,
        "user-2",
        "req-read-1",
    )
    assert send["ip_address"] == read["ip_address"] == "127.0.0.1"
    assert json.loads(send["details"])["notification_id"] == nid
    assert json.loads(read["details"])["updated"] == 1
