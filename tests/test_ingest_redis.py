"""Domain events from the Redis stream `notifyd:events`: real daemons, PostgreSQL, Redis, SMTP.

Promises checked (each test names its own): an event becomes an email that arrives and an
in-app notification, stored with an audit row and its (tenant, event id) row, rendered from
the tenant's templates (a channel the tenant has no template for is skipped unless the event
names it); a duplicate event makes one set of notifications; the same event id in two
tenants makes two; a malformed event (bad JSON, a missing or unknown field, an unknown
channel or template key, a template the context cannot render, an unreadable phone) goes to
the dead-letter stream with a reason naming the field, is acknowledged, and the events behind
it are delivered; an event for one tenant never makes rows in another, nor uses its
templates; two instances on one stream make no duplicates, even of an event published twice;
NOTIFYD_EVENTS_ENABLED=false consumes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.ids import OpaqueIdRule
from notifyd.ingest.events import EventLimits, MalformedEvent, parse_event
from notifyd.settings import DEFAULT_ID_PATTERN
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import Received, SmtpSink

EVENTS = "notifyd:events"
DEAD = "notifyd:dead"
TENANT_A = "TEN-A"
TENANT_B = "TEN-B"
KEY = "application_received"

# fast recovery, so a test never waits out production-sized leases
FAST = {
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "2",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}

TEMPLATES: dict[str, dict[str, str]] = {
    "email": {
        "subject": "We received your application for {{ Position }}",
        "text_body": "Hello {{ recipient_name | default('there') }}, thank you for applying "
        "to {{ Position }}.",
    },
    "in_app": {"text_body": "Application for {{ Position }} received"},
    "sms": {"text_body": "Application for {{ Position }} received"},
}


def event(
    event_id: str = "evt-1",
    tenant_id: str = TENANT_A,
    *,
    recipients: list[Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "tenant_id": tenant_id,
        "type": "application.received",
        "template_key": KEY,
        "context": {"Position": "Backend Engineer"},
        "recipients": recipients
        if recipients is not None
        else [{"user_id": "cand-1", "email": "cand-1@example.com", "name": "Jo"}],
        **fields,
    }


async def start(daemon_factory: DaemonFactory, sink: SmtpSink, **env: str) -> Daemon:
    return await daemon_factory(
        **{"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(sink.port), **FAST, **env}
    )


async def put_templates(
    daemon: Daemon, tenant: str, channels: tuple[str, ...] = ("email", "in_app")
) -> None:
    async with Api(daemon) as api:
        for channel in channels:
            status, body, _ = await api.request(
                "PUT",
                f"/templates/{KEY}/{channel}/",
                json=TEMPLATES[channel],
                tenant=tenant,
                user="admin-1",
                role="admin",
            )
            assert status == 200, body


async def publish(redis: Redis, body: Mapping[str, Any] | bytes | str) -> None:
    """What another service does: one field, `event`, with the JSON."""
    raw = body if isinstance(body, bytes | str) else orjson.dumps(body)
    await redis.xadd(EVENTS, {"event": raw})


async def consumed(redis: Redis, timeout: float = 15) -> None:
    """Every entry of the events stream read and acknowledged by the ingest group."""

    async def done() -> bool:
        groups: Any = await redis.xinfo_groups(EVENTS)
        ingest = [g for g in groups if g["name"] in (b"ingest", "ingest")]
        return bool(ingest) and ingest[0]["pending"] == 0 and ingest[0]["lag"] == 0

    await wait_for(done, timeout=timeout)


async def dead_letters(redis: Redis, count: int, timeout: float = 15) -> list[dict[str, str]]:
    async def enough() -> bool:
        return int(await redis.xlen(DEAD)) >= count

    await wait_for(enough, timeout=timeout)
    entries: Any = await redis.xrange(DEAD)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def arrived(sink: SmtpSink, count: int, timeout: float = 20) -> list[Received]:
    return await asyncio.to_thread(sink.wait_for, count, timeout)


async def all_sent(db: asyncpg.Connection, count: int, timeout: float = 20) -> None:
    """`count` notifications exist and every one reached `sent`: the pipeline is idle."""

    async def done() -> bool:
        rows = await db.fetch("SELECT status FROM notifications")
        return len(rows) == count and all(r["status"] == "sent" for r in rows)

    await wait_for(done, timeout=timeout)


async def rows_of(db: asyncpg.Connection, tenant: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT id, channel, recipient, user_id, subject, body, category, created_by, status "
        "FROM notifications WHERE tenant_id = $1 ORDER BY channel",
        tenant,
    )


# --- the schema, without a daemon --------------------------------------------------------

LIMITS = EventLimits(
    max_bytes=2048,
    max_recipients=3,
    context_max_keys=5,
    id_rule=OpaqueIdRule.from_settings(128, DEFAULT_ID_PATTERN),
)


def reasons(raw: Any) -> str:
    with pytest.raises(MalformedEvent) as caught:
        parse_event(raw if isinstance(raw, bytes | str) else orjson.dumps(raw), LIMITS)
    return str(caught.value)


def test_a_valid_event_parses_into_typed_fields() -> None:
    parsed = parse_event(
        orjson.dumps(
            event(
                recipients=[
                    {"user_id": "auth0|42", "email": " jo@example.com ", "locale": "pt-BR"},
                    {"phone": "+44 7911 123456", "timezone": "Europe/London"},
                ],
                channels=["email", "sms", "email"],
                critical=True,
            )
        ),
        LIMITS,
    )
    assert (parsed.tenant_id, parsed.event_id, parsed.type) == (
        TENANT_A,
        "evt-1",
        "application.received",
    )
    assert parsed.channels == ("email", "sms")
    assert parsed.critical is True and parsed.category is None
    assert parsed.recipients[0].email == "jo@example.com"
    assert parsed.recipients[0].locale == "pt-BR"
    assert parsed.recipients[1].timezone == "Europe/London"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{not json", "event: is not valid JSON"),
        (b"[1, 2]", "event: must be a JSON object"),
        (b"x" * 2049, "event: is 2049 bytes; at most 2048"),
        ({k: v for k, v in event().items() if k != "tenant_id"}, "tenant_id: is required"),
        (event(tenant_id="TEN A"), "tenant_id: may only contain"),
        (event(channels=["email", "fax"]), "channels: unknown channel 'fax'"),
        (event(channels=[]), "channels: must be a non-empty list"),
        (event(template_key="bad key!"), "template_key: must be 1-128 letters"),
        (event(type=""), "type: must be 1-64 letters"),
        (event(chanels=["email"]), "chanels: is not a known field"),
        (event(context=[1]), "context: must be a JSON object"),
        (event(context={str(i): i for i in range(6)}), "context: must have at most 5 keys"),
        (event(critical="yes"), "critical: must be true or false"),
        (event(recipients=[]), "recipients: must be a non-empty list"),
        (event(recipients=[{"email": "a@example.com"}] * 4), "recipients: must have at most 3"),
        (event(recipients=[{"locale": "en"}]), "recipients[0]: needs a user_id, an email"),
        (event(recipients=[{"email": "nope"}]), "recipients[0].email: must be an email"),
        (event(recipients=[{"user_id": "u", "fax": "1"}]), "recipients[0].fax: is not a known"),
        (
            event(recipients=[{"user_id": "u", "timezone": "Mars/Base"}]),
            "recipients[0].timezone: must be an IANA time zone",
        ),
        (event(recipients=[{"user_id": "u", "locale": "english!"}]), "recipients[0].locale"),
        (event(recipients=["u"]), "recipients[0]: must be a JSON object"),
    ],
)
def test_a_malformed_event_is_refused_naming_the_field(raw: Any, expected: str) -> None:
    assert expected in reasons(raw)


def test_every_problem_is_named_at_once_and_no_value_is_echoed() -> None:
    said = reasons(
        {
            "event_id": "e 1",
            "type": "t",
            "template_key": "k",
            "recipients": [{"email": "secret-person@@example.com"}],
        }
    )
    assert "event_id:" in said and "tenant_id: is required" in said
    assert "recipients[0].email" in said
    assert "secret-person" not in said


# --- end to end --------------------------------------------------------------------------


async def test_an_event_becomes_an_email_that_arrives_and_an_in_app_notification(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: an event is stored like a POST (rows, audit rows, rendered from the
    tenant's templates), then delivered. The recipient's phone gets nothing: the tenant has
    no SMS template, and the event did not ask for SMS."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A)
    recipient = {"user_id": "cand-1", "email": "cand-1@example.com", "phone": "+14155550100"}
    await publish(redis, event(recipients=[{**recipient, "name": "Jo Doe"}]))

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    assert mail.message["Subject"] == "We received your application for Backend Engineer"
    assert "Hello Jo Doe, thank you for applying to Backend Engineer." in str(
        mail.message.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    )
    await all_sent(db, 2)
    email, in_app = await rows_of(db, TENANT_A)
    assert (email["channel"], email["recipient"], email["user_id"]) == (
        "email",
        "cand-1@example.com",
        "cand-1",
    )
    assert (in_app["channel"], in_app["recipient"], in_app["user_id"]) == (
        "in_app",
        "cand-1",
        "cand-1",
    )
    assert in_app["body"] == "Application for Backend Engineer received"
    assert {r["category"] for r in (email, in_app)} == {"application.received"}
    assert {r["created_by"] for r in (email, in_app)} == {"event:application.received"}
    assert mail.notifyd_id == str(email["id"])

    ingested = await db.fetchrow("SELECT * FROM ingested_events")
    assert ingested is not None
    assert (ingested["tenant_id"], ingested["event_id"], ingested["source"]) == (
        TENANT_A,
        "evt-1",
        "redis",
    )
    assert set(ingested["notification_ids"]) == {email["id"], in_app["id"]}
    audits = await db.fetch("SELECT action, details FROM audit_log WHERE tenant_id = $1", TENANT_A)
    sends = [orjson.loads(a["details"]) for a in audits if a["action"] == "notification.send"]
    assert len(sends) == 2
    assert all(d["via"] == "ingest" and d["event_id"] == "evt-1" for d in sends)
    await consumed(redis)

    # the user sees it in their notification center, like any in-app notification
    async with Api(daemon) as api:
        status, listed, _ = await api.get("/notifications/", tenant=TENANT_A, user="cand-1")
    assert status == 200
    assert {n["notification_type"] for n in listed} == {"email", "in_app"}


async def test_a_duplicate_event_makes_one_set_of_notifications(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: deduplication by (tenant, event id). Published three times (twice at
    once, once after the first was stored): one email, one in-app notification."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A)
    await publish(redis, event())
    await publish(redis, event())
    await consumed(redis)
    await publish(redis, event())
    await consumed(redis)
    await all_sent(db, 2)
    assert len(smtp_sink.received) == 1
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == 1
    assert int(await redis.xlen(DEAD)) == 0


async def test_the_same_event_id_in_two_tenants_makes_two_sets(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: event ids are the publisher's, scoped by tenant: two tenants' events with
    one id are two events, each rendered from its own tenant's templates."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A)
    await put_templates(daemon, TENANT_B)
    await publish(redis, event("evt-7", TENANT_A))
    await publish(redis, event("evt-7", TENANT_B))
    await arrived(smtp_sink, 2)
    await all_sent(db, 4)
    assert len(await rows_of(db, TENANT_A)) == 2
    assert len(await rows_of(db, TENANT_B)) == 2
    pairs = await db.fetch("SELECT tenant_id, event_id FROM ingested_events ORDER BY tenant_id")
    assert [(p["tenant_id"], p["event_id"]) for p in pairs] == [
        (TENANT_A, "evt-7"),
        (TENANT_B, "evt-7"),
    ]


async def test_an_event_never_makes_rows_in_another_tenant_nor_uses_its_templates(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: tenants never see each other. Tenant A's event makes rows for A only;
    tenant B's event with a template key only A has is dead-lettered, and makes nothing."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A)
    await publish(redis, event("evt-1", TENANT_A))
    await publish(redis, event("evt-2", TENANT_B))
    (dead,) = await dead_letters(redis, 1)
    assert "template_key" in dead["reason"] and KEY in dead["reason"]
    assert orjson.loads(dead["f:event"])["tenant_id"] == TENANT_B
    await all_sent(db, 2)
    tenants = await db.fetch("SELECT DISTINCT tenant_id FROM notifications")
    assert [t["tenant_id"] for t in tenants] == [TENANT_A]
    for table in ("ingested_events", "audit_log"):
        count = await db.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", TENANT_B)
        assert count == 0, table


async def test_malformed_events_are_dead_lettered_with_the_reason_and_the_stream_keeps_flowing(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: a malformed event does not block the queue: it goes to the dead-letter
    stream at once, with a reason naming the field and its original fields, and is
    acknowledged; the good event published after all of them is delivered."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A, ("email", "in_app", "sms"))
    bad: list[tuple[Any, str]] = [
        (b'{"event_id": "evt-x", ', "event: is not valid JSON"),
        ({k: v for k, v in event("e1").items() if k != "tenant_id"}, "tenant_id: is required"),
        (event("e2", channels=["pigeon"]), "channels: unknown channel 'pigeon'"),
        (event("e3", template_key="no_such_template"), "unknown template_key 'no_such_template'"),
        (event("e4", context={}), "needs 'Position'"),
        (
            event("e5", channels=["sms"], recipients=[{"phone": "12"}]),
            "recipients[0].phone",
        ),
    ]
    for body, _ in bad:
        await publish(redis, body)
    await redis.xadd(EVENTS, {"payload": b"{}"})  # not how events are published
    await publish(redis, event("good"))

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    letters = await dead_letters(redis, len(bad) + 1)
    assert len(letters) == len(bad) + 1
    assert all(letter["stream"] == EVENTS and letter["group"] == "ingest" for letter in letters)
    # entries are handled concurrently: match each letter by the event as published (kept
    # for a replay), not by position
    reason_of = {letter.get("f:event", "").encode(): letter["reason"] for letter in letters}
    for body, expected in bad:
        sent = body if isinstance(body, bytes) else orjson.dumps(body)
        assert expected in reason_of[sent], (expected, reason_of[sent])
    (no_event,) = [letter for letter in letters if "f:payload" in letter]
    assert "no 'event' field" in no_event["reason"]
    await consumed(redis)  # nothing left pending: every bad entry was acknowledged
    await all_sent(db, 2)
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["good"]


async def test_an_event_that_fails_for_another_reason_stays_pending_until_it_is_stored(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: an event is not lost nor dead-lettered when PostgreSQL cannot store it
    (here its table is briefly missing): the entry stays pending, is taken over again after
    NOTIFYD_CLAIM_IDLE, and is stored and delivered once PostgreSQL can."""
    daemon = await start(daemon_factory, smtp_sink)
    await put_templates(daemon, TENANT_A)
    await db.execute("ALTER TABLE ingested_events RENAME TO ingested_events_away")
    try:
        await publish(redis, event())

        async def retried() -> bool:
            pending: Any = await redis.xpending_range(EVENTS, "ingest", "-", "+", 10)
            return bool(pending) and int(pending[0]["times_delivered"]) >= 2

        await wait_for(retried, timeout=20)
        assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    finally:
        await db.execute("ALTER TABLE ingested_events_away RENAME TO ingested_events")
    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    await consumed(redis)
    await all_sent(db, 2)
    assert int(await redis.xlen(DEAD)) == 0


async def test_two_instances_on_one_stream_make_no_duplicates(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: several instances share the stream and nothing doubles, even for an
    event its publisher sent twice (the two copies may be read by different instances at
    the same moment: the (tenant, event id) row lets one of them store it)."""
    first = await start(daemon_factory, smtp_sink, NOTIFYD_INSTANCE_NAME="one")
    await start(daemon_factory, smtp_sink, NOTIFYD_INSTANCE_NAME="two")
    await put_templates(first, TENANT_A, ("email",))
    count = 30
    for n in range(count):
        body = event(f"evt-{n}", recipients=[{"email": f"person-{n}@example.com"}])
        await publish(redis, body)
        await publish(redis, body)
    await arrived(smtp_sink, count)
    await consumed(redis)
    await all_sent(db, count)
    recipients = [r.rcpt_tos[0] for r in smtp_sink.received]
    assert sorted(recipients) == sorted(f"person-{n}@example.com" for n in range(count))
    assert await db.fetchval("SELECT count(*) FROM ingested_events") == count


async def test_ingestion_can_be_switched_off(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, redis: Redis
) -> None:
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_EVENTS_ENABLED="false")
    assert daemon.supervisor is not None
    assert "ingest:redis" not in daemon.supervisor.status()
    on = await start(daemon_factory, smtp_sink)
    assert on.supervisor is not None
    assert on.supervisor.status().get("ingest:redis") is not None


# --- the source's binding: which tenants it may publish for, and `critical` --------------


async def test_an_event_beyond_the_streams_binding_is_dead_lettered_and_nothing_stored(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise (issue 24, "ingestion is bound to tenants"): a stream bound to TEN-A
    cannot be used to send as TEN-B, nor to send `critical` when the operator said no: each
    such event is dead-lettered with a reason naming the field and the setting, nothing is
    stored for it (no notification, no dedupe row), and the allowed event behind them is
    delivered."""
    daemon = await start(
        daemon_factory,
        smtp_sink,
        NOTIFYD_EVENTS_TENANTS=TENANT_A,
        NOTIFYD_EVENTS_ALLOW_CRITICAL="false",
    )
    await put_templates(daemon, TENANT_A)
    await put_templates(daemon, TENANT_B)  # TEN-B exists and could send: the binding refuses
    other_tenant = event("as-b", TENANT_B)
    critical = event("urgent", critical=True)
    await publish(redis, other_tenant)
    await publish(redis, critical)
    await publish(redis, event("good"))

    (mail,) = await arrived(smtp_sink, 1)
    assert mail.rcpt_tos == ["cand-1@example.com"]
    letters = await dead_letters(redis, 2)
    reason_of = {letter["f:event"].encode(): letter["reason"] for letter in letters}
    assert reason_of[orjson.dumps(other_tenant)] == (
        "tenant_id: the redis source may not publish for tenant 'TEN-B' "
        "(not in NOTIFYD_EVENTS_TENANTS)"
    )
    assert reason_of[orjson.dumps(critical)] == (
        "critical: the redis source may not send critical events "
        "(NOTIFYD_EVENTS_ALLOW_CRITICAL is false)"
    )
    await consumed(redis)  # acknowledged: refused for good, not retried
    await all_sent(db, 2)
    assert await rows_of(db, TENANT_B) == []
    assert await db.fetchval("SELECT bool_or(critical) FROM notifications") is False
    assert await db.fetchval("SELECT array_agg(event_id) FROM ingested_events") == ["good"]


async def test_an_event_within_the_streams_binding_goes_through_critical_included(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """The promise: a listed tenant's events, `critical` ones included when allowed (the
    default), are accepted as before."""
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_EVENTS_TENANTS=f"{TENANT_A},{TENANT_B}")
    await put_templates(daemon, TENANT_B)
    await publish(redis, event("urgent", TENANT_B, critical=True))
    await arrived(smtp_sink, 1)
    await all_sent(db, 2)
    rows = await db.fetch("SELECT tenant_id, critical FROM notifications")
    assert {(r["tenant_id"], r["critical"]) for r in rows} == {(TENANT_B, True)}
    assert int(await redis.exists(DEAD)) == 0


def test_admit_is_one_rule_for_tenant_and_critical() -> None:
    """The rule itself: `*` admits every tenant; a list only its own; critical only where
    allowed; both problems named at once."""
    from notifyd.ingest.binding import Binding, EventNotAllowed, admit
    from tests.helpers import make_settings

    def binding(**env: str) -> Binding:
        return Binding.for_source(make_settings("postgresql://x/y", "redis://x", **env), "redis")

    parsed = parse_event(orjson.dumps(event("e", "TEN-Z", critical=True)), LIMITS)
    admit(parsed, binding())  # the default: open, critical allowed
    assert binding().open_to_all
    admit(parsed, binding(NOTIFYD_EVENTS_TENANTS="TEN-A, TEN-Z"))
    with pytest.raises(EventNotAllowed) as caught:
        admit(
            parsed,
            binding(NOTIFYD_EVENTS_TENANTS="TEN-A", NOTIFYD_EVENTS_ALLOW_CRITICAL="false"),
        )
    assert [p.field for p in caught.value.problems] == ["tenant_id", "critical"]
    assert isinstance(caught.value, MalformedEvent)  # handled (dead-lettered) like one
