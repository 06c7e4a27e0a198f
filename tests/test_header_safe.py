"""No value smuggles a mail header, and a message that cannot be built fails for good at once.

Python's email package starts a new header line at \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028
and \\u2029 as well as at CR/LF: `"Hello\\x0cReply-To\\t: x@evil.test"` passed the CR/LF check
and added a Reply-To on Python 3.11, and `\\x0bBcc:` raised HeaderParseError, so the row was
claimed, crashed and put back forever. One rule (`tags.HEADER_UNSAFE`) now refuses them in
REST, the CLI, ingested events and reminder contacts; rendered subjects are flattened; the
SMTP provider refuses any that still reach it as a permanent failure; and a delivery whose
claims keep ending without an outcome is failed after a bound.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.actors.sender import UNRECORDED_CLAIMS
from notifyd.app import Daemon
from notifyd.ids import OpaqueIdRule, uuid7
from notifyd.ingest.events import EventLimits, MalformedEvent, parse_event
from notifyd.keys import Keys
from notifyd.payloads import DeliveryRef
from notifyd.providers.base import Delivery, PermanentError
from notifyd.providers.smtp import build_message
from notifyd.settings import DEFAULT_ID_PATTERN
from notifyd.tags import header_problem
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink

PROBLEM = "application/problem+json"
# every character the email package (or a reader of the header) takes as a line break, and
# other controls that have no place in a header
UNSAFE = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00"]
INJECTION = "Hello{}Reply-To\t: x@evil.test"
FAST = {
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}


def test_the_one_rule_refuses_every_control_character_but_tab() -> None:
    for char in [*UNSAFE, "\x01", "\x1f", "\x7f", "\x80", "\x9f"]:
        assert header_problem(f"a{char}b") is not None, repr(char)
    for fine in ("Interview\tat 10", "Olá — ünïcode ✓", "a\u200bb"):
        assert header_problem(fine) is None


# -------------------------------------------------------------------------------- REST


@pytest.mark.parametrize("char", UNSAFE, ids=repr)
async def test_rest_refuses_a_control_character_in_subject_and_recipient(
    api: Api, db: asyncpg.Connection, char: str
) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("subject", {"recipient": "a@example.com", "subject": INJECTION.format(char)}),
        ("recipient", {"recipient": f"a{char}b@example.com", "subject": "S"}),
        ("recipient", {"recipient": f"a@example.com{char}Bcc: c@example.com", "subject": "S"}),
    ]
    for field, body in cases:
        status, problem, headers = await api.post(
            "/notifications/send/",
            {"notification_type": "email", "message": "M", **body},
            role="service",
        )
        assert status == 422, (body, problem)
        assert headers["Content-Type"].startswith(PROBLEM)
        assert field in {e["field"] for e in problem["errors"]}, problem
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


@pytest.mark.parametrize("char", UNSAFE, ids=repr)
async def test_rest_refuses_a_control_character_in_a_reminder_contact(
    api: Api, db: asyncpg.Connection, char: str
) -> None:
    now = datetime.now(UTC)
    for contact, field in (
        ({"name": f"Jo{char}Bcc: x@evil.test"}, "candidate_contact.name"),
        ({"email": f"jo{char}@example.com"}, "candidate_contact.email"),
    ):
        status, problem, _ = await api.post(
            "/reminders/create/",
            {
                "application_id": "app-1",
                "candidate_id": "cand-1",
                "employer_id": "emp-1",
                "interview_time": (now + timedelta(hours=48)).isoformat(),
                "reminder_time": (now + timedelta(hours=24)).isoformat(),
                "candidate_contact": contact,
            },
            role="service",
        )
        assert status == 422, problem
        assert field in {e["field"] for e in problem["errors"]}, problem
    assert await db.fetchval("SELECT count(*) FROM interview_reminders") == 0


async def test_a_template_subject_and_a_tenants_from_address_refuse_them_too(api: Api) -> None:
    status, problem, _ = await api.request(
        "PUT",
        "/templates/k/email/",
        json={"subject": INJECTION.format("\x0c"), "text_body": "x"},
        role="admin",
    )
    assert status == 422 and "subject" in {e["field"] for e in problem["errors"]}, problem
    status, problem, _ = await api.request(
        "PUT",
        "/tenants/current/settings/",
        json={"smtp": {"host": "relay.example.com", "from_email": "a@example.com\x85Bcc: b"}},
        role="admin",
    )
    assert status == 422, problem
    assert "smtp.from_email" in {e["field"] for e in problem["errors"]}, problem


# ------------------------------------------------------------------------- ingested events

LIMITS = EventLimits(
    max_bytes=4096,
    max_recipients=3,
    context_max_keys=5,
    id_rule=OpaqueIdRule.from_settings(128, DEFAULT_ID_PATTERN),
)


def _event(**recipient: str) -> dict[str, Any]:
    return {
        "event_id": "evt-1",
        "tenant_id": "TEN-A",
        "type": "application.received",
        "template_key": "k",
        "context": {},
        "recipients": [{"user_id": "cand-1", **recipient}],
    }


@pytest.mark.parametrize("char", UNSAFE, ids=repr)
def test_an_event_with_a_control_character_in_a_recipient_is_malformed(char: str) -> None:
    for key, value in (("name", f"Jo{char}Bcc: x"), ("email", f"jo{char}@example.com")):
        with pytest.raises(MalformedEvent) as caught:
            parse_event(orjson.dumps(_event(**{key: value})), LIMITS)
        assert f"recipients[0].{key}: must be a single line" in str(caught.value)


async def test_an_ingested_event_with_such_a_value_is_dead_lettered_with_the_reason(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    await _start(daemon_factory, smtp_sink)
    await redis.xadd(
        "notifyd:events", {"event": orjson.dumps(_event(email="jo@example.com\x0bBcc: x@e.test"))}
    )

    async def dead() -> bool:
        return bool(await redis.xlen("notifyd:dead") == 1)

    await wait_for(dead, timeout=15)
    ((_, letter),) = await redis.xrange("notifyd:dead")
    assert b"recipients[0].email: must be a single line" in letter[b"reason"]
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0


# --------------------------------------------------------------------------- SMTP provider


def _delivery(**fields: Any) -> Delivery:
    values: dict[str, Any] = {
        "id": str(uuid7()),
        "tenant_id": "TEN-A",
        "channel": "email",
        "recipient": "to@example.com",
        "user_id": None,
        "subject": "S",
        "body": "b",
        "html_body": None,
        "category": None,
        "attempt": 1,
        "created_at": datetime.now(UTC),
    }
    return Delivery(**{**values, **fields})


@pytest.mark.parametrize("char", UNSAFE, ids=repr)
def test_a_message_with_an_unsafe_header_is_a_permanent_error(char: str) -> None:
    for fields, words in (
        ({"subject": INJECTION.format(char)}, "Subject must be a single line"),
        ({"recipient": f"to@example.com{char}Bcc: x@evil.test"}, "To must be a single line"),
    ):
        with pytest.raises(PermanentError) as caught:
            build_message(_delivery(**fields), "from@example.com")
        assert words in caught.value.reason
    with pytest.raises(PermanentError):
        build_message(_delivery(), f"from@example.com{char}Bcc: x@evil.test")


def test_any_failure_building_a_message_is_a_permanent_error() -> None:
    with pytest.raises(PermanentError) as caught:
        build_message(_delivery(body="\ud800"), "from@example.com")  # cannot be UTF-8
    assert caught.value.reason.startswith("cannot build the message")


async def _start(daemon_factory: DaemonFactory, sink: SmtpSink, **env: str) -> Daemon:
    return await daemon_factory(
        **{
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(sink.port),
            "EMAIL_FROM": "jobs@example.com",
            **FAST,
            **env,
        }
    )


async def _dispatched_row(
    db: asyncpg.Connection,
    redis: Redis,
    daemon: Daemon,
    *,
    subject: str,
    status: str = "dispatched",
    attempts: int = 0,
) -> Any:
    nid = uuid7()
    await db.execute(
        "INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, subject, body,"
        " status, attempts, claimed_at) VALUES ($1, 'TEN-A', 'test', 'email', 'to@example.com',"
        " $2, 'body', $3, $4, CASE WHEN $3 = 'sending' THEN now() - interval '1 hour' END)",
        nid,
        subject,
        status,
        attempts,
    )
    keys = Keys(daemon.settings.redis_prefix)
    await redis.xadd(keys.deliver("email"), DeliveryRef("TEN-A", str(nid)).to_fields())
    return nid


async def _final(db: asyncpg.Connection, nid: Any) -> asyncpg.Record:
    async def done() -> bool:
        status = await db.fetchval("SELECT status FROM notifications WHERE id = $1", nid)
        return status in ("sent", "failed")

    await wait_for(done, timeout=20)
    row = await db.fetchrow(
        "SELECT status, attempts, last_error FROM notifications WHERE id = $1", nid
    )
    assert row is not None
    return row


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\u2028"], ids=repr)
async def test_a_stored_row_with_an_unsafe_subject_fails_for_good_at_once(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    redis: Redis,
    char: str,
) -> None:
    """A row that somehow holds such a subject (written before this rule, or by hand) fails
    on its first attempt with the reason, and the relay receives nothing: no header injected,
    no retry (a HeaderParseError used to crash the sender on every claim, forever)."""
    daemon = await _start(daemon_factory, smtp_sink)
    bad = await _dispatched_row(db, redis, daemon, subject=INJECTION.format(char))
    good = await _dispatched_row(db, redis, daemon, subject="Fine")
    row = await _final(db, bad)
    assert row["status"] == "failed" and row["attempts"] == 1
    assert (
        "Subject must be a single line, without line breaks or other control characters"
        in row["last_error"]
    )
    assert (await _final(db, good))["status"] == "sent"
    (mail,) = await asyncio.to_thread(smtp_sink.wait_for, 1, 10)
    assert mail.message["Subject"] == "Fine" and mail.message["Reply-To"] is None
    assert len(smtp_sink.received) == 1


async def test_a_delivery_whose_claims_ended_without_an_outcome_fails_after_the_bound(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Attempts are always bounded: a row left `sending` by claims that never recorded an
    outcome (a handler that crashed on it, a process killed while sending) is put back by
    the sweeper and claimed again; past NOTIFYD_SEND_MAX_ATTEMPTS + UNRECORDED_CLAIMS claims
    it fails for good instead of being sent (or crashing) again and again."""
    daemon = await _start(daemon_factory, smtp_sink, NOTIFYD_SEND_MAX_ATTEMPTS="3")
    limit = 3 + UNRECORDED_CLAIMS
    spent = await _dispatched_row(
        db, redis, daemon, subject="Spent", status="sending", attempts=limit
    )
    fresh = await _dispatched_row(
        db, redis, daemon, subject="Fresh", status="sending", attempts=limit - 1
    )
    row = await _final(db, spent)
    assert row["status"] == "failed" and row["attempts"] == limit + 1
    assert "gave up after" in row["last_error"] and "without an outcome" in row["last_error"]
    assert (await _final(db, fresh))["status"] == "sent"  # the last claim allowed still sends
    (mail,) = await asyncio.to_thread(smtp_sink.wait_for, 1, 10)
    assert mail.message["Subject"] == "Fresh"


@pytest.mark.parametrize("char", ["\x0c", "\x9f"], ids=repr)
async def test_a_context_value_reaching_a_rendered_subject_is_flattened(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, redis: Redis, char: str
) -> None:
    """A template's output is flattened, not refused: the email arrives, with one Subject
    and no Reply-To; every control character is flattened (C1 ones such as \x9f were not)."""
    daemon = await _start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        status, _, _ = await api.request(
            "PUT",
            "/templates/t/email/",
            json={"subject": "Hi {{ name }}", "text_body": "b"},
            role="admin",
        )
        assert status == 200
        status, body, _ = await api.post(
            "/notifications/send/",
            {
                "notification_type": "email",
                "recipient": "to@example.com",
                "template_key": "t",
                "context": {"name": INJECTION.format(char)},
            },
            role="service",
        )
        assert status == 202, body
    (mail,) = await asyncio.to_thread(smtp_sink.wait_for, 1, 20)
    assert mail.message["Subject"] == "Hi Hello Reply-To\t: x@evil.test"
    assert mail.message["Reply-To"] is None
