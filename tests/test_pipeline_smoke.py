"""The delivery pipeline end to end: accepted → dispatched → sent, once, through real SMTP;
an in-app notification sent and published on its user's feed."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
from redis.asyncio import Redis

from notifyd.keys import SEND_GROUP, Keys
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink


async def nothing_left_to_send(redis: Redis, stream: str) -> bool:
    """Every entry of the delivery stream was read and acknowledged: no redelivery, no
    takeover can send anything again."""
    for group in await redis.xinfo_groups(stream):
        if group["name"] in (SEND_GROUP, SEND_GROUP.encode()):
            return bool(group["pending"] == 0 and group["lag"] == 0)
    return False


async def test_email_reaches_the_smtp_server_once_and_is_marked_sent(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port))
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {
                "notification_type": "email",
                "subject": "Interview Scheduled",
                "message": "Your interview is tomorrow at 10 AM.",
                "recipient": "candidate@example.com",
            },
            role="service",
        )
        assert status == 202, body
        notification_id = body["notification_id"]

        async def sent() -> bool:
            row = await db.fetchrow(
                "SELECT status FROM notifications WHERE id = $1::uuid", notification_id
            )
            return row is not None and row["status"] == "sent"

        await wait_for(sent, timeout=15)
        await asyncio.to_thread(smtp_sink.wait_for, 1)
        # once: counted when nothing is left that could send it again, not at the first one
        stream = Keys(daemon.settings.redis_prefix).deliver("email")
        await wait_for(lambda: nothing_left_to_send(redis, stream), timeout=15)
        [received] = smtp_sink.received
        assert received.rcpt_tos == ["candidate@example.com"]
        assert received.notifyd_id == notification_id
        assert str(received.message["Subject"]) == "Interview Scheduled"
        status, detail, _ = await api.get(f"/notifications/{notification_id}/", role="service")
        assert detail["status"] == "sent"
        assert detail["attempts"] == 1


async def test_in_app_notification_is_marked_sent_and_published(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory()
    assert daemon.pipeline is not None
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/notifications/send/",
            {"notification_type": "in_app", "recipient": "auth0|42", "message": "Hello"},
            role="service",
        )
        assert status == 202

        async def sent() -> bool:
            value = await db.fetchval(
                "SELECT status FROM notifications WHERE id = $1::uuid", body["notification_id"]
            )
            return bool(value == "sent")

        await wait_for(sent, timeout=15)
    # published: the event is on the user's feed (its history stream, whence the live
    # fan-out and every replay read it), with the notification's id
    missed = await daemon.pipeline.history.since("TEN-0001", "auth0|42", "0-0")
    events = [orjson.loads(payload) for _, payload in missed.events]
    assert [(e["type"], e["id"], e["message"]) for e in events] == [
        ("notification", body["notification_id"], "Hello")
    ]
