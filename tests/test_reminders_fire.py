"""Interview reminders fire on time, once, to both sides of the interview."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
from redis.asyncio import Redis

from notifyd.keys import Keys
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for, wait_pipeline_idle
from tests.smtp_sink import SmtpSink


def rfc3339(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


async def test_a_due_reminder_fires_once_to_candidate_and_employer(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port))
    now = datetime.now(UTC)
    interview = (now + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/reminders/create/",
            {
                "application_id": "app-1",
                "candidate_id": "cand-1",
                "employer_id": "emp-1",
                "interview_time": rfc3339(interview),
                "reminder_time": rfc3339(now + timedelta(seconds=1)),
                "candidate_contact": {
                    "email": "cand@example.com",
                    "timezone": "Asia/Tokyo",
                    "name": "Aiko",
                },
                "employer_contact": {"timezone": "Europe/Berlin"},
            },
            role="service",
        )
        assert status == 201, body
        reminder_id = body["reminder_id"]

        async def fired() -> bool:
            value = await db.fetchval(
                "SELECT status FROM interview_reminders WHERE id = $1::uuid", reminder_id
            )
            return bool(value == "fired")

        await wait_for(fired, timeout=15)
        row = await db.fetchrow(
            "SELECT lateness_ms, late, notification_ids FROM interview_reminders "
            "WHERE id = $1::uuid",
            reminder_id,
        )
        assert row["late"] is False
        assert 0 <= row["lateness_ms"] < 2000
        notifications = await db.fetch(
            "SELECT channel, recipient, user_id, critical FROM notifications "
            "WHERE id = ANY($1::uuid[]) ORDER BY channel, recipient",
            row["notification_ids"],
        )
        assert [(n["channel"], n["recipient"]) for n in notifications] == [
            ("email", "cand@example.com"),
            ("in_app", "cand-1"),
            ("in_app", "emp-1"),
        ]
        assert all(n["critical"] for n in notifications)
        [email] = await asyncio.to_thread(smtp_sink.wait_for, 1)
        text = email.message.get_body(preferencelist=("plain",))
        assert text is not None
        content = text.get_content()
        assert "Aiko" in content
        assert "JST" in content and "18:00" in content  # 09:00 UTC in Tokyo
        status, listed, _ = await api.get("/notifications/", user="emp-1")
        assert "CET" in listed[0]["message"] or "CEST" in listed[0]["message"]
        # exactly once: counted once the pipeline is idle (no entry unread or pending in any
        # stream, nothing due on the wheel, no notification on its way), so a second firing
        # still in flight would be counted too
        await wait_pipeline_idle(redis, db, Keys(daemon.settings.redis_prefix))
        assert await db.fetchval("SELECT count(*) FROM notifications") == 3
        assert len(smtp_sink.received) == 1
        fired = "SELECT count(*) FROM audit_log WHERE action = 'reminder.fired'"
        assert await db.fetchval(fired) == 1


async def test_a_reminder_is_written_in_the_tenants_default_locale(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """A reminder's notifications are rendered when they are dispatched, with the locale
    fallback a REST send has: the contact's locale, else the tenant's `default_locale`."""
    daemon = await daemon_factory()
    now = datetime.now(UTC)
    async with Api(daemon) as api:
        for locale, words in (("pt-BR", "Entrevista"), ("en", "Interview")):
            template = {
                "locale": locale,
                "subject": words,
                "text_body": words + " {{ interview_time }}",
            }
            status, _, _ = await api.request(
                "PUT", "/templates/interview_reminder/in_app/", json=template, role="admin"
            )
            assert status == 200
        status, _, _ = await api.request(
            "PUT", "/tenants/current/settings/", json={"default_locale": "pt-BR"}, role="admin"
        )
        assert status == 200
        status, body, _ = await api.post(
            "/reminders/create/",
            {
                "application_id": "app-pt",
                "candidate_id": "cand-pt",
                "employer_id": "emp-pt",
                "interview_time": rfc3339(now + timedelta(days=1)),
                "reminder_time": rfc3339(now + timedelta(seconds=1)),
                "employer_contact": {"locale": "en"},
            },
            role="service",
        )
        assert status == 201, body

        async def both_sent() -> bool:
            sent = await db.fetchval(
                "SELECT count(*) FROM notifications WHERE status = 'sent' AND channel = 'in_app'"
            )
            return bool(sent == 2)

        await wait_for(both_sent, timeout=15)
        _, candidate, _ = await api.get("/notifications/", user="cand-pt")
        _, employer, _ = await api.get("/notifications/", user="emp-pt")
    # no contact locale: the tenant's default; the employer's contact names its own
    assert (candidate[0]["subject"], candidate[0]["message"][:11]) == ("Entrevista", "Entrevista ")
    assert (employer[0]["subject"], employer[0]["message"][:10]) == ("Interview", "Interview ")
