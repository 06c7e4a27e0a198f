"""The delivery pipeline end to end: accepted → dispatched → sent, once, through real SMTP."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink


async def test_email_reaches_the_smtp_server_once_and_is_marked_sent(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
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
