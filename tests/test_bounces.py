"""Bounces and complaints over SMTP (issue 29): VERP return paths and the bounce listener.

Promises checked (each test names its own): with NOTIFYD_BOUNCE_DOMAIN every email's
envelope sender is `bounce+<id>@domain`; a DSN (the RFC 3464 example's shape, and Exim's
X-Failed-Recipients form) submitted over SMTP to the listener marks the notification
`bounced`, puts the address on the list (even critical sends then end `suppressed`); a
delayed DSN is noted only; a report about another address changes nothing; an ARF complaint
suppresses the address for the notification's category; the listener refuses addresses that
are not VERP paths of its domain.
"""

from __future__ import annotations

import asyncio
import uuid

import aiosmtplib
import asyncpg
import pytest

from notifyd.app import Daemon
from notifyd.bounces import notification_of, return_path
from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink
from tests.test_pipeline_email import arrived, row, send, start, wait_status, with_id
from tests.test_webhooks import FAST as WEBHOOKS_FAST
from tests.test_webhooks import create, receiver

DOMAIN = "bounces.example"


def test_a_return_path_names_its_notification_and_nothing_else_does() -> None:
    """Promise: the VERP address round-trips to its notification id; another domain, prefix
    or a malformed token names none."""
    nid = str(uuid.uuid4())
    path = return_path(DOMAIN, nid)
    assert path.startswith("bounce+") and path.endswith("@" + DOMAIN)
    assert str(notification_of(path, DOMAIN)) == nid
    assert str(notification_of(f"<{path}>", DOMAIN)) == nid
    assert notification_of(path, "other.example") is None
    assert notification_of(path.replace("bounce+", "bouncy+"), DOMAIN) is None
    assert notification_of("bounce+short@" + DOMAIN, DOMAIN) is None
    assert notification_of("postmaster@" + DOMAIN, DOMAIN) is None


def rfc3464(recipient: str, *, action: str = "failed", status: str = "5.1.1") -> bytes:
    """A DSN in the shape of RFC 3464's examples (multipart/report, delivery-status)."""
    diagnostic = "550 5.1.1 user unknown" if status.startswith("5") else "451 4.4.1 try later"
    return (
        "From: MAILER-DAEMON@mx.example.org\r\n"
        "To: <bounce@bounces.example>\r\n"
        "Subject: Delivery Status Notification\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        "\r\n"
        "--b\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        f"Your message to {recipient} could not be delivered.\r\n"
        "--b\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n"
        "\r\n"
        f"Original-Recipient: rfc822;{recipient}\r\n"
        f"Final-Recipient: rfc822;{recipient}\r\n"
        f"Action: {action}\r\n"
        f"Status: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n"
        "--b--\r\n"
    ).encode()


def exim(recipient: str) -> bytes:
    """Exim's own bounce: plain text with X-Failed-Recipients."""
    return (
        "From: Mail Delivery System <Mailer-Daemon@mx.example.net>\r\n"
        "To: bounce@bounces.example\r\n"
        "Subject: Mail delivery failed: returning message to sender\r\n"
        f"X-Failed-Recipients: {recipient}\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "\r\n"
        "This message was created automatically by mail delivery software.\r\n"
        "\r\n"
        "A message that you sent could not be delivered to one or more of its\r\n"
        "recipients. This is a permanent error. The following address(es) failed:\r\n"
        "\r\n"
        f"  {recipient}\r\n"
        "    SMTP error from remote mail server after RCPT TO:\r\n"
        "    550 5.1.1 No such user\r\n"
    ).encode()


def arf(recipient: str) -> bytes:
    """An ARF complaint (RFC 5965's example shape)."""
    return (
        "From: <abuse@mailbox.example>\r\n"
        "To: <bounce@bounces.example>\r\n"
        "Subject: FW: Earn money\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="p"\r\n'
        "\r\n"
        "--p\r\n"
        "Content-Type: text/plain\r\n"
        "\r\n"
        "This is an email abuse report.\r\n"
        "--p\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        "Feedback-Type: abuse\r\n"
        "User-Agent: SomeGenerator/1.0\r\n"
        "Version: 1\r\n"
        f"Original-Rcpt-To: {recipient}\r\n"
        "--p--\r\n"
    ).encode()


async def bounce_daemon(daemon_factory: DaemonFactory, sink: SmtpSink) -> tuple[Daemon, int]:
    """A daemon whose bounce listener (an actor, started after the daemon) is listening."""
    port = free_port()
    daemon = await start(
        daemon_factory,
        sink,
        NOTIFYD_BOUNCE_DOMAIN=DOMAIN,
        NOTIFYD_BOUNCE_SMTP_PORT=str(port),
        # FAST's 2 s lease: a send slowed past it on a loaded CI machine is claimed again
        # and sent twice (the at-least-once edge), and these tests read the one copy
        NOTIFYD_CLAIM_IDLE="10",
    )

    await wait_for(lambda: _listening(port))
    return daemon, port


async def submit(port: int, rcpt: str, message: bytes) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10)
    await client.connect()
    try:
        await client.sendmail("", [rcpt], message)
    finally:
        await client.quit()


async def sent_with_path(
    api: Api, db: asyncpg.Connection, sink: SmtpSink, count: int, **fields: object
) -> tuple[str, str]:
    nid = str((await send(api, **fields))["notification_id"])  # type: ignore[arg-type]
    await wait_status(db, nid, "sent")
    await arrived(sink, count)
    [received] = with_id(sink, nid)
    return nid, received.mail_from


@pytest.mark.parametrize("form", ["rfc3464", "exim"])
async def test_a_permanent_bounce_marks_bounced_and_suppresses_even_critical_sends(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection, form: str
) -> None:
    """Promise: the envelope sender is the notification's VERP path; a permanent DSN to it
    over SMTP marks it `bounced` and lists the address (`hard_bounce`), so a later critical
    send ends `suppressed` without reaching the relay."""
    daemon, port = await bounce_daemon(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        nid, path = await sent_with_path(api, db, smtp_sink, 1, recipient="Gone@Example.com")
        assert notification_of(path, DOMAIN) == uuid.UUID(nid)
        report = rfc3464("gone@example.com") if form == "rfc3464" else exim("gone@example.com")
        await submit(port, path, report)
        record = await wait_status(db, nid, "bounced")
        assert "gone@example.com" in record["last_error"]
        status, listed, _ = await api.get("/suppressions/", user="admin-1", role="admin")
        assert status == 200
        assert [(e["address"], e["reason"]) for e in listed] == [
            ("gone@example.com", "hard_bounce")
        ]
        again = (await send(api, recipient="gone@example.com", critical=True))["notification_id"]
        await wait_status(db, again, "suppressed")
    assert len(smtp_sink.received) == 1


async def test_a_delay_is_noted_and_a_report_about_another_address_changes_nothing(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a transient DSN leaves the status as it is (noted in last_error only); a
    permanent one naming an address that is not the notification's changes nothing."""
    daemon, port = await bounce_daemon(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        nid, path = await sent_with_path(api, db, smtp_sink, 1, recipient="slow@example.com")
        await submit(port, path, rfc3464("slow@example.com", action="delayed", status="4.4.1"))

        async def noted() -> bool:
            return str((await row(db, nid))["last_error"] or "").startswith("delayed")

        await wait_for(noted)
        await submit(port, path, rfc3464("victim@example.com"))
        listed = (await api.get("/suppressions/", user="admin-1", role="admin"))[1]
    assert (await row(db, nid))["status"] == "sent"
    assert listed == []


async def test_a_complaint_suppresses_the_address_for_its_category(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: an ARF complaint lists the address for the notification's category only:
    the next email in it is suppressed, another category's is sent."""
    daemon, port = await bounce_daemon(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        _, path = await sent_with_path(
            api, db, smtp_sink, 1, recipient="ann@example.com", category="digest"
        )
        await submit(port, path, arf("ann@example.com"))

        async def listed() -> list[tuple[str, str]]:
            answer = await api.get("/suppressions/", user="admin-1", role="admin")
            return [(e["category"], e["reason"]) for e in answer[1]]

        await wait_for(listed)
        assert await listed() == [("digest", "complaint")]
        digest = (await send(api, recipient="ann@example.com", category="digest"))[
            "notification_id"
        ]
        other = (await send(api, recipient="ann@example.com", category="interview"))[
            "notification_id"
        ]
        await wait_status(db, digest, "suppressed")
        await wait_status(db, other, "sent")


async def test_the_listener_refuses_addresses_that_are_not_its_verp_paths(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink
) -> None:
    """Promise: only `bounce+<id>@NOTIFYD_BOUNCE_DOMAIN` is accepted at RCPT TO (550)."""
    _, port = await bounce_daemon(daemon_factory, smtp_sink)
    for rcpt in ("postmaster@" + DOMAIN, return_path("other.example", str(uuid.uuid4()))):
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await submit(port, rcpt, rfc3464("x@example.com"))


async def test_bounced_and_complained_make_their_webhook_events(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a bounce sends `notification.bounced` and a complaint
    `notification.complained` to the tenant's endpoints, signed as every webhook."""
    port = free_port()
    daemon = await start(
        daemon_factory,
        smtp_sink,
        NOTIFYD_BOUNCE_DOMAIN=DOMAIN,
        NOTIFYD_BOUNCE_SMTP_PORT=str(port),
        **WEBHOOKS_FAST,
    )
    async with receiver() as hook, Api(daemon) as api:
        events = ["notification.bounced", "notification.complained"]
        hook.secrets.append((await create(api, hook.url, events, tenant="TEN-0001"))["secret"])
        gone, gone_path = await sent_with_path(api, db, smtp_sink, 1, recipient="g@example.com")
        ann, ann_path = await sent_with_path(
            api, db, smtp_sink, 2, recipient="a@example.com", category="digest"
        )
        await wait_for(lambda: _listening(port))
        await submit(port, gone_path, rfc3464("g@example.com"))
        await submit(port, ann_path, arf("a@example.com"))
        await wait_for(lambda: len(hook.received) >= 2)
    got = sorted((r.body["type"], r.body["data"]["notification_id"]) for r in hook.received)
    assert got == sorted([("notification.bounced", gone), ("notification.complained", ann)])
    bounced = next(r for r in hook.received if r.body["type"] == "notification.bounced")
    assert bounced.body["data"]["status"] == "bounced"


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True
