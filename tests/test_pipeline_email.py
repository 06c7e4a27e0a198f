"""The email channel end to end: a real daemon, real PostgreSQL/Redis, real aiosmtpd relays.

Promises checked (each test names its own): an email arrives once with From/To/Subject/Date/
Message-ID/X-Notifyd-Id; a template with an HTML body becomes multipart/alternative with the
context HTML-escaped in the HTML part only; List-Unsubscribe only with a preference link and a
user; a missing template variable is the caller's 422 on `context` and stores nothing; a
tenant's own SMTP relay and from address are used for that tenant only; SMTP 4xx is retried
and delivered once, 5xx fails at once with the server's words, is dead-lettered and can be
requeued by an admin; transient failures stop after NOTIFYD_SEND_MAX_ATTEMPTS; opt-outs are
respected and `critical` bypasses them; a failure for good emails RECIPIENT_LIST, at most once
per NOTIFYD_ALERT_INTERVAL; a burst reuses at most NOTIFYD_SMTP_CONNECTIONS_PER_TENANT
connections; sent deliveries are counted in /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import parseaddr, parsedate_to_datetime
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.settings import Settings
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import Received, SmtpSink

FROM = "jobs@lumina.example"
TENANT_A = "TEN-A"
TENANT_B = "TEN-B"
SECRET_KEY = "tenant-secret-key-for-email-tests"
PREFS_URL = "https://app.example.com/prefs?tenant={tenant_id}&user={user_id}&c={category}"
DEAD = "notifyd:dead"

# Small delivery settings so retries and sweeps happen in milliseconds.
FAST = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}

CONTEXT = {
    "Candidate Name": "John Doe",
    "Position": "Senior Developer",
    "Company": "Lumina Care",
    "Team": "R&D <Platform>",
}
TEMPLATE = {
    "subject": "Interview for {{ Position }} at {{ company }}",
    "text_body": "Hello {{ ctx['Candidate Name'] }}, your interview for {{ position }} "
    "with {{ Team }} is scheduled.",
    "html_body": "<p>Hello <b>{{ candidate_name }}</b>, your interview for {{ Position }} "
    "with {{ team }} is scheduled.</p>",
}


async def start(daemon_factory: DaemonFactory, sink: SmtpSink, **env: str) -> Daemon:
    return await daemon_factory(
        **{
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(sink.port),
            "EMAIL_FROM": FROM,
            **FAST,
            **env,
        }
    )


async def send(
    api: Api,
    *,
    recipient: str = "candidate@example.com",
    tenant: str = "TEN-0001",
    role: str = "service",
    expect: int = 202,
    **fields: Any,
) -> Any:
    body: dict[str, Any] = {"notification_type": "email", "recipient": recipient, **fields}
    if "template_key" not in fields:
        body.setdefault("subject", "Interview Scheduled")
        body.setdefault("message", "Your interview is tomorrow at 10 AM.")
    status, answer, _ = await api.post(
        "/notifications/send/", body, tenant=tenant, user="backend", role=role
    )
    assert status == expect, answer
    return answer


async def row(db: asyncpg.Connection, notification_id: str) -> asyncpg.Record:
    record = await db.fetchrow(
        "SELECT status, attempts, last_error FROM notifications WHERE id = $1::uuid",
        notification_id,
    )
    assert record is not None
    return record


async def wait_status(
    db: asyncpg.Connection, notification_id: str, status: str, timeout: float = 15
) -> asyncpg.Record:
    async def reached() -> bool:
        return bool((await row(db, notification_id))["status"] == status)

    await wait_for(reached, timeout=timeout)
    return await row(db, notification_id)


async def arrived(sink: SmtpSink, count: int, timeout: float = 20) -> list[Received]:
    return await asyncio.to_thread(sink.wait_for, count, timeout)


def with_id(sink: SmtpSink, notification_id: str) -> list[Received]:
    return [r for r in list(sink.received) if r.notifyd_id == notification_id]


def part(message: EmailMessage, subtype: str) -> str:
    body = message.get_body(preferencelist=(subtype,))
    assert body is not None and body.get_content_subtype() == subtype
    return str(body.get_content())


async def put_template(api: Api, key: str, body: dict[str, Any], tenant: str = "TEN-0001") -> None:
    status, answer, _ = await api.request(
        "PUT", f"/templates/{key}/email/", json=body, tenant=tenant, user="admin-1", role="admin"
    )
    assert status == 200, answer


# --- headers, bodies, templates ----------------------------------------------------------------


async def test_email_arrives_once_with_the_headers_a_mail_client_expects(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: one message per notification, From = EMAIL_FROM, To/Subject as sent, a Date and a
    Message-ID, X-Notifyd-Id naming the notification; plain text only when there is no HTML;
    no List-Unsubscribe without NOTIFYD_PREFERENCES_URL (even with a user)."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        sent = await send(api, user_id="cand-1")
        notification_id = sent["notification_id"]
        assert (await wait_status(db, notification_id, "sent"))["attempts"] == 1
        [received] = await arrived(smtp_sink, 1)
    message = received.message
    assert received.rcpt_tos == ["candidate@example.com"]
    assert received.mail_from == FROM
    assert parseaddr(str(message["From"]))[1] == FROM
    assert parseaddr(str(message["To"]))[1] == "candidate@example.com"
    assert str(message["Subject"]) == "Interview Scheduled"
    assert parsedate_to_datetime(str(message["Date"])).tzinfo is not None
    assert re.fullmatch(r"<[^<>@\s]+@[^<>@\s]+>", str(message["Message-ID"]))
    assert received.notifyd_id == notification_id
    assert message["List-Unsubscribe"] is None
    assert message.get_content_type() == "text/plain"
    assert "Your interview is tomorrow at 10 AM." in str(message.get_content())
    assert len(smtp_sink.received) == 1


async def test_template_with_html_renders_alternatives_with_escaped_context(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a stored template with an html_body gives multipart/alternative (text + HTML);
    seed-style keys ("Candidate Name") are reachable; the context is HTML-escaped in the HTML
    part and left as written in the text part and subject."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await put_template(api, "interviewScheduling", TEMPLATE)
        sent = await send(api, template_key="interviewScheduling", context=CONTEXT)
        await wait_status(db, sent["notification_id"], "sent")
        [received] = await arrived(smtp_sink, 1)
    message = received.message
    assert message.get_content_type() == "multipart/alternative"
    assert str(message["Subject"]) == "Interview for Senior Developer at Lumina Care"
    text = part(message, "plain")
    html = part(message, "html")
    assert "Hello John Doe, your interview for Senior Developer with R&D <Platform>" in text
    assert "<b>John Doe</b>" in html
    assert "R&amp;D &lt;Platform&gt;" in html
    assert "<Platform>" not in html


async def test_list_unsubscribe_only_for_a_user_when_a_preference_link_is_configured(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: with NOTIFYD_PREFERENCES_URL set, an email for a user carries List-Unsubscribe
    (and the one-click header) with the link filled in; one without a user_id carries none."""
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_PREFERENCES_URL=PREFS_URL)
    async with Api(daemon) as api:
        for_user = (await send(api, user_id="cand-9", category="interview"))["notification_id"]
        anonymous = (await send(api, recipient="someone@example.com"))["notification_id"]
        await wait_status(db, for_user, "sent")
        await wait_status(db, anonymous, "sent")
        await arrived(smtp_sink, 2)
    [with_user] = with_id(smtp_sink, for_user)
    [without_user] = with_id(smtp_sink, anonymous)
    expected = "<https://app.example.com/prefs?tenant=TEN-0001&user=cand-9&c=interview>"
    # a long value is folded onto its own line; unfolding leaves the folding space
    assert str(with_user.message["List-Unsubscribe"]).strip() == expected
    assert with_user.message["List-Unsubscribe-Post"] is None  # one-click is not promised
    assert without_user.message["List-Unsubscribe"] is None
    assert without_user.message["List-Unsubscribe-Post"] is None


async def test_list_unsubscribe_link_percent_encodes_opaque_ids(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: ids from other services are opaque (`auth0|42`, `a+b`): the link in
    List-Unsubscribe is a valid URI that gives the preference page the very same id back
    (`|` is not allowed in a URI, and `+` in a query reads as a space)."""
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_PREFERENCES_URL=PREFS_URL)
    async with Api(daemon) as api:
        sent = await send(api, user_id="auth0|42+x")
        await wait_status(db, sent["notification_id"], "sent")
        [received] = await arrived(smtp_sink, 1)
    link = str(received.message["List-Unsubscribe"]).strip()
    assert "user=auth0%7C42%2Bx&" in link, link


async def test_missing_template_variable_is_a_422_on_context_and_nothing_is_stored(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: a template needing a variable the context lacks is rejected at send time with a
    problem naming `context` (and the variable); no row, no intent, nothing sent."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await put_template(api, "interviewScheduling", TEMPLATE)
        context = {k: v for k, v in CONTEXT.items() if k != "Position"}
        problem = await send(api, template_key="interviewScheduling", context=context, expect=422)
    fields = {error["field"]: error["message"] for error in problem["errors"]}
    assert "context" in fields, problem
    assert "Position" in fields["context"]
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    assert await redis.xlen("notifyd:intents") == 0
    assert smtp_sink.received == []


# --- per-tenant SMTP ---------------------------------------------------------------------------


async def test_tenant_smtp_settings_route_only_that_tenants_email(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a tenant admin's SMTP settings (host, port, from address) carry that tenant's
    email, with its from address; another tenant keeps the global EMAIL_* relay and EMAIL_FROM."""
    with SmtpSink() as tenant_sink:
        daemon = await start(
            daemon_factory,
            smtp_sink,
            NOTIFYD_TENANT_SECRET_KEY=SECRET_KEY,
            # the test sink is on loopback, which the egress policy refuses unless allowed
            NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.0/8",
        )
        async with Api(daemon) as api:
            smtp = {"host": "127.0.0.1", "port": tenant_sink.port, "from_email": "hr@a.example"}
            status, body, _ = await api.request(
                "PUT",
                "/tenants/current/settings/",
                json={"smtp": smtp},
                tenant=TENANT_A,
                user="admin-a",
                role="admin",
            )
            assert status == 200, body
            a_id = (await send(api, tenant=TENANT_A, recipient="a@example.com"))["notification_id"]
            b_id = (await send(api, tenant=TENANT_B, recipient="b@example.com"))["notification_id"]
            await wait_status(db, a_id, "sent")
            await wait_status(db, b_id, "sent")
            [via_tenant] = await arrived(tenant_sink, 1)
            [via_global] = await arrived(smtp_sink, 1)
    assert via_tenant.notifyd_id == a_id
    assert via_tenant.mail_from == "hr@a.example"
    assert parseaddr(str(via_tenant.message["From"]))[1] == "hr@a.example"
    assert via_global.notifyd_id == b_id
    assert via_global.mail_from == FROM
    assert parseaddr(str(via_global.message["From"]))[1] == FROM


# --- retries, failures, dead letters, requeue --------------------------------------------------


async def test_smtp_421_then_success_is_delivered_once(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: SMTP 4xx is transient: retried with backoff, then sent; the refused attempt
    left nothing at the server, so exactly one message arrives; attempts counts both."""
    smtp_sink.fail_next(1, "421 4.3.2 Service busy, try again later")
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        notification_id = (await send(api))["notification_id"]
        record = await wait_status(db, notification_id, "sent")
        await arrived(smtp_sink, 1)
    assert record["attempts"] == 2
    assert record["last_error"] is None
    assert [r.notifyd_id for r in smtp_sink.received] == [notification_id]


async def test_smtp_550_fails_at_once_is_dead_lettered_and_an_admin_can_requeue_it(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, redis: Redis
) -> None:
    """Promise: SMTP 5xx is permanent: the delivery fails after one attempt with the server's
    code and words, goes to the dead-letter stream and shows failed in the API; an admin's
    requeue (202) sends it; requeueing a sent one is 409; only admins may requeue (403)."""
    smtp_sink.fail_next(1, "550 5.7.1 Message rejected as spam")
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        notification_id = (await send(api))["notification_id"]
        record = await wait_status(db, notification_id, "failed")
        assert record["attempts"] == 1
        assert "550" in record["last_error"]
        assert "Message rejected as spam" in record["last_error"]

        entries: Any = await redis.xrange(DEAD)
        dead = [fields for _, fields in entries if fields.get(b"id") == notification_id.encode()]
        assert len(dead) == 1, entries
        assert b"550" in dead[0][b"reason"]

        path = f"/notifications/{notification_id}/"
        status, detail, _ = await api.get(path, role="service", user="backend")
        assert status == 200
        assert detail["status"] == "failed"
        assert "550" in detail["last_error"]
        assert smtp_sink.received == []

        status, problem, _ = await api.post(f"{path}retry/", role="service", user="backend")
        assert status == 403, problem
        assert (await row(db, notification_id))["status"] == "failed"

        status, body, _ = await api.post(f"{path}retry/", role="admin", user="admin-1")
        assert status == 202, body
        record = await wait_status(db, notification_id, "sent")
        assert record["attempts"] == 1
        [received] = await arrived(smtp_sink, 1)
        assert received.notifyd_id == notification_id

        status, problem, _ = await api.post(f"{path}retry/", role="admin", user="admin-1")
        assert status == 409, problem
        status, detail, _ = await api.get(path, role="service", user="backend")
        assert detail["status"] == "sent"
    assert len(smtp_sink.received) == 1


async def test_smtp_550_at_rcpt_fails_with_the_servers_reason(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a recipient refused for good at RCPT (5xx) fails the delivery at once, saying
    why, without retries."""
    smtp_sink.refuse_rcpt("nobody@example.com", "550 5.1.1 No such user here")
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        notification_id = (await send(api, recipient="nobody@example.com"))["notification_id"]
        record = await wait_status(db, notification_id, "failed")
    assert record["attempts"] == 1
    assert "550" in record["last_error"]
    assert "No such user here" in record["last_error"]
    assert smtp_sink.received == []


async def test_transient_failure_on_every_attempt_fails_after_max_attempts(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: retries stop at NOTIFYD_SEND_MAX_ATTEMPTS; the delivery is then failed with the
    last reason, and nothing was delivered."""
    smtp_sink.fail_next(3, "451 4.3.0 Temporary local problem")
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_SEND_MAX_ATTEMPTS="3")
    async with Api(daemon) as api:
        notification_id = (await send(api))["notification_id"]
        record = await wait_status(db, notification_id, "failed")
    assert record["attempts"] == 3
    assert "451" in record["last_error"]
    assert "Temporary local problem" in record["last_error"]
    assert smtp_sink.received == []


# --- preferences -------------------------------------------------------------------------------


async def put_preferences(api: Api, user: str, body: dict[str, Any]) -> None:
    status, answer, _ = await api.request("PUT", "/preferences/", json=body, user=user)
    assert status == 200, answer


async def test_channel_opt_out_suppresses_email_and_critical_bypasses_it(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a user who opted out of email gets no email (the row ends `suppressed`); a
    critical notification from a service is delivered anyway."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await put_preferences(api, "cand-7", {"channels": {"email": False}})
        quiet = (await send(api, user_id="cand-7"))["notification_id"]
        record = await wait_status(db, quiet, "suppressed")
        assert "email" in record["last_error"]
        critical = (await send(api, user_id="cand-7", critical=True))["notification_id"]
        await wait_status(db, critical, "sent")
        await arrived(smtp_sink, 1)
    assert [r.notifyd_id for r in smtp_sink.received] == [critical]
    assert (await row(db, quiet))["status"] == "suppressed"


async def test_category_opt_out_suppresses_that_category_only(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: opting out of a category suppresses email in that category, not others, and a
    critical one in that category still goes out."""
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        await put_preferences(api, "cand-8", {"categories": {"marketing": False}})
        marketing = (await send(api, user_id="cand-8", category="marketing"))["notification_id"]
        record = await wait_status(db, marketing, "suppressed")
        assert "marketing" in record["last_error"]
        other = (await send(api, user_id="cand-8", category="interview"))["notification_id"]
        critical = (await send(api, user_id="cand-8", category="marketing", critical=True))[
            "notification_id"
        ]
        await wait_status(db, other, "sent")
        await wait_status(db, critical, "sent")
        await arrived(smtp_sink, 2)
    assert sorted(str(r.notifyd_id) for r in smtp_sink.received) == sorted([other, critical])
    assert (await row(db, marketing))["status"] == "suppressed"


# --- operator alerts ---------------------------------------------------------------------------


class _FailureLog(logging.Handler):
    """Ids the sender logged as failed for good (it raises the alert right after, no await)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failed: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "delivery failed for good":
            self.failed.append(str(getattr(record, "id", "")))


@pytest.fixture
def failure_log() -> Iterator[_FailureLog]:
    handler = _FailureLog()
    logger = logging.getLogger("notifyd.actors.sender")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_failure_for_good_alerts_recipient_list_once_per_interval(
    daemon_factory: DaemonFactory,
    smtp_sink: SmtpSink,
    db: asyncpg.Connection,
    failure_log: _FailureLog,
) -> None:
    """Promise: a delivery that fails for good emails the RECIPIENT_LIST operators through the
    global relay; a second failure within NOTIFYD_ALERT_INTERVAL sends no second alert. (A
    policy refusal: a refused mailbox is the recipient's, suppressed without an alert.)"""
    smtp_sink.refuse_rcpt("nobody@example.com", "554 5.7.1 Rejected by policy")
    daemon = await start(daemon_factory, smtp_sink, RECIPIENT_LIST="ops@example.com")
    assert daemon.pipeline is not None
    async with Api(daemon) as api:
        first = (await send(api, recipient="nobody@example.com"))["notification_id"]
        await wait_status(db, first, "failed")
        await asyncio.to_thread(smtp_sink.wait_for, 1)
        [alert] = smtp_sink.messages_to("ops@example.com")
        assert first in str(alert.message.get_content())
        assert "554" in str(alert.message.get_content())
        assert "failed" in str(alert.message["Subject"])
        assert parseaddr(str(alert.message["From"]))[1] == FROM

        second = (await send(api, recipient="nobody@example.com"))["notification_id"]
        await wait_status(db, second, "failed")

        async def second_alert_raised() -> bool:
            return second in failure_log.failed

        await wait_for(second_alert_raised)
        # Alerts go out in order: once this one arrives, the second failure's alert was handled.
        daemon.pipeline.alerts.raise_alert("test-barrier", "barrier", "barrier")
        await asyncio.to_thread(smtp_sink.wait_for, 2)
    alerts = smtp_sink.messages_to("ops@example.com")
    assert [str(a.message["Subject"]) for a in alerts][1:] == ["barrier"]
    assert len(alerts) == 2


async def test_alert_message_id_is_well_formed_with_a_display_name_from(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: alert emails carry a valid Message-ID also when EMAIL_FROM has a display name
    (Django's DEFAULT_FROM_EMAIL is often "Name <address>"), as delivery emails do."""
    smtp_sink.refuse_rcpt("nobody@example.com", "554 5.7.1 Rejected by policy")
    daemon = await start(
        daemon_factory,
        smtp_sink,
        RECIPIENT_LIST="ops@example.com",
        EMAIL_FROM=f"Lumina Jobs <{FROM}>",
    )
    async with Api(daemon) as api:
        failing = (await send(api, recipient="nobody@example.com"))["notification_id"]
        ok = (await send(api))["notification_id"]
        await wait_status(db, failing, "failed")
        await wait_status(db, ok, "sent")
        await arrived(smtp_sink, 2)
    [delivery] = with_id(smtp_sink, ok)
    [alert] = smtp_sink.messages_to("ops@example.com")
    well_formed = r"<[^<>@\s]+@[^<>@\s]+>"
    assert re.fullmatch(well_formed, str(delivery.message["Message-ID"]))
    assert re.fullmatch(well_formed, str(alert.message["Message-ID"])), alert.message["Message-ID"]


# --- connections and metrics -------------------------------------------------------------------


async def test_burst_reuses_at_most_the_configured_smtp_connections(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: connections are pooled per relay: 20 emails to the global relay travel over at
    most NOTIFYD_SMTP_CONNECTIONS_PER_TENANT (2) SMTP sessions, each email once."""
    daemon = await start(daemon_factory, smtp_sink, NOTIFYD_SMTP_CONNECTIONS_PER_TENANT="2")
    async with Api(daemon) as api:
        ids = [
            (await send(api, recipient=f"c{i}@example.com"))["notification_id"] for i in range(20)
        ]

        async def all_sent() -> bool:
            count = await db.fetchval(
                "SELECT count(*) FROM notifications WHERE status = 'sent' AND id = ANY($1::uuid[])",
                ids,
            )
            return bool(count == 20)

        await wait_for(all_sent, timeout=30)
        received = await arrived(smtp_sink, 20)
    assert sorted(str(r.notifyd_id) for r in received) == sorted(ids)
    assert 1 <= smtp_sink.sessions <= 2
    assert len({r.session for r in received}) <= 2


async def test_sent_email_is_counted_in_metrics(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: /metrics counts delivery outcomes by channel:
    notifyd_deliveries_total{channel="email",outcome="sent"}."""
    daemon = await start(daemon_factory, smtp_sink)
    pattern = re.compile(
        r'^notifyd_deliveries_total\{channel="email",outcome="sent"\} (\S+)$', re.M
    )
    async with Api(daemon) as api:
        for _ in range(2):
            await wait_status(db, (await send(api))["notification_id"], "sent")

        async def counted() -> bool:
            status, text, _ = await api.get("/metrics", auth=False)
            assert status == 200
            match = pattern.search(text)
            return match is not None and float(match.group(1)) == 2.0

        # the counter moves just after the row is marked sent, so wait for it too
        await wait_for(counted)


class _AlwaysCrashing:
    """An actor that keeps crashing, the kind the operators must hear about."""

    name = "flaky-actor"

    async def run(self, stop: asyncio.Event) -> None:
        raise RuntimeError("broken on purpose")


async def test_an_actor_that_keeps_crashing_emails_the_operators_once(
    settings_factory: Callable[..., Settings], smtp_sink: SmtpSink
) -> None:
    """Operator alerts: an actor that crashes and is restarted is reported to
    RECIPIENT_LIST, once per NOTIFYD_ALERT_INTERVAL however often it crashes."""
    settings = settings_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_sink.port),
        RECIPIENT_LIST="ops@example.com,cto@example.com",
    )
    daemon = Daemon(settings, extra_actors=[_AlwaysCrashing()])
    await daemon.start()
    try:
        [alert] = await asyncio.to_thread(smtp_sink.wait_for, 1)
        assert sorted(alert.rcpt_tos) == ["cto@example.com", "ops@example.com"]
        assert "flaky-actor" in str(alert.message["Subject"])

        async def restarted_again() -> bool:
            rendered = daemon.metrics.render().decode()
            return 'notifyd_actor_restarts_total{actor="flaky-actor"} 3.0' in rendered

        await wait_for(restarted_again, timeout=20)
        assert len(smtp_sink.messages_to("ops@example.com")) == 1
    finally:
        await daemon.stop()
