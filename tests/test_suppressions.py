"""The suppression list (issue 29): what puts an address on it, what it stops, its routes.

Promises checked (each test names its own): an address on the list ends a send `suppressed`
with the reason and no relay or Twilio call; a dead address (hard bounce, a relay's refusal of
the mailbox) and an SMS opt-out stop even `critical` sends, a category's entry (complaint,
unsubscribe) stops that category only and not critical ones; a relay's 550-class refusal at
RCPT TO and Twilio's 21610 (at send time, or in a status callback, or a STOP reported as
`OptOutType`) put the address on the list; `GET /suppressions/` (admin, paged) and
`DELETE /suppressions/{channel}/{address}/` (admin, audited); every value is bounded with a
problem naming the field; tenants never see or remove each other's entries.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from notifyd.providers.smtp import mailbox_refused
from notifyd.settings import Settings
from notifyd.store import suppressions as store
from notifyd.store.pool import close_pool, create_pool
from notifyd.suppressions import listed_reason
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.smtp_sink import SmtpSink
from tests.test_pipeline_email import row, send, start, wait_status
from tests.test_pipeline_sms import (
    SEED_SMS,
    SID,
    TOKEN,
    message_for,
    send_sms,
    sms_daemon,
)
from tests.test_pipeline_sms import wait_status as wait_sms_status
from tests.twilio_standin import TwilioStandin, post_signed

PATH = "/suppressions/"
PROBLEM_JSON = "application/problem+json"
E164 = "+917568992589"  # SEED_SMS's recipient in region IN


# --- the rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "category", "critical", "suppressed"),
    [
        (None, None, False, False),
        ("hard_bounce", "", False, True),
        ("hard_bounce", "", True, True),
        ("smtp_refused", "", True, True),
        ("sms_opt_out", "", True, True),
        ("complaint", "marketing", False, True),
        ("complaint", "marketing", True, False),
        ("unsubscribe", "digest", False, True),
        ("unsubscribe", "digest", True, False),
    ],
)
def test_which_entries_stop_which_sends(
    reason: str | None, category: str, critical: bool, suppressed: bool
) -> None:
    """Promise: a dead address or an SMS opt-out stops even critical sends; a category's
    complaint or unsubscribe is bypassed by critical as preferences are."""
    said = listed_reason(reason, category, critical=critical)
    assert (said is not None) is suppressed
    if said is not None:
        assert reason is not None and reason in said
        assert (category in said) if category else "category" not in said


@pytest.mark.parametrize(
    ("code", "text", "dead"),
    [
        (550, "5.1.1 No such user here", True),
        (550, "5.1.10 Recipient address has null MX", True),
        (550, "5.2.1 Mailbox disabled", True),
        (553, "5.1.3 Bad recipient address syntax", True),
        (550, "No such user", True),
        (551, "User not local", True),
        (550, "5.7.1 Message rejected as spam", False),
        (554, "5.7.1 Relay access denied", False),
        (552, "5.2.2 Mailbox full", False),
        (554, "Transaction failed", False),
        (450, "4.1.1 Try later", False),
    ],
)
def test_which_refusals_name_the_mailbox_dead(code: int, text: str, dead: bool) -> None:
    """Promise: only a refusal of the address itself (5.1.x, 5.2.1, or a bare 550/551/553)
    suppresses; a policy or content refusal (5.7.x, 552, 554) and a 4xx do not."""
    assert mailbox_refused(code, text) is dead


# --- the routes --------------------------------------------------------------------------------


@pytest.fixture
async def pool(settings_factory: Callable[..., Settings]) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings_factory())
    try:
        yield pool
    finally:
        await close_pool(pool)


async def admin_get(api: Api, path: str, tenant: str = "TEN-0001") -> tuple[int, Any, Any]:
    return await api.get(path, tenant=tenant, user="admin-1", role="admin")


async def test_list_is_admin_only_paged_newest_first(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: GET /suppressions/ shows the tenant's entries to its admins only, newest
    first, paged with a Link to the next page."""
    for i in range(3):
        await store.add(pool, "TEN-0001", "email", f"Dead{i}@Example.com", "hard_bounce", "test")
    await store.add(
        pool, "TEN-0001", "email", "c@example.com", "unsubscribe", "test", category="digest"
    )
    status, first, headers = await api.get(PATH + "?limit=3", user="admin-1", role="admin")
    assert status == 200, first
    assert [e["address"] for e in first] == [
        "c@example.com",
        "dead2@example.com",
        "dead1@example.com",
    ]
    assert first[0]["category"] == "digest" and first[0]["reason"] == "unsubscribe"
    assert first[1]["category"] is None and first[1]["reason"] == "hard_bounce"
    assert 'rel="next"' in headers["Link"]
    next_url = headers["Link"].split(">")[0].lstrip("<")
    status, second, headers = await api.get(next_url, user="admin-1", role="admin")
    assert status == 200
    assert [e["address"] for e in second] == ["dead0@example.com"]
    assert "Link" not in headers
    for role in ("service", "user"):
        status, problem, headers = await api.get(PATH, role=role)
        assert status == 403, problem
        assert headers["Content-Type"].startswith(PROBLEM_JSON)


async def test_delete_takes_every_category_off_audited(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: DELETE /suppressions/{channel}/{address}/ (admin) removes the address's
    entries, writes an audit row, and answers 404 once there is nothing left."""
    await store.add(pool, "TEN-0001", "email", "ann@example.com", "complaint", "t", category="m")
    await store.add(pool, "TEN-0001", "email", "ann@example.com", "smtp_refused", "t")
    target = PATH + "email/Ann%40Example.com/"
    status, problem, _ = await api.request("DELETE", target, role="service")
    assert status == 403, problem
    status, _, _ = await api.request("DELETE", target, user="admin-1", role="admin")
    assert status == 204
    assert (await admin_get(api, PATH))[1] == []
    status, problem, headers = await api.request("DELETE", target, user="admin-1", role="admin")
    assert status == 404, problem
    assert headers["Content-Type"].startswith(PROBLEM_JSON)
    audit = await pool.fetchrow(
        "SELECT details FROM audit_log WHERE tenant_id = 'TEN-0001' AND action = $1",
        "suppression.delete",
    )
    assert audit is not None
    assert audit["details"]["address"] == "ann@example.com"
    assert audit["details"]["reasons"] == ["complaint", "smtp_refused"]


async def test_bad_path_values_are_a_problem_naming_the_field(api: Api) -> None:
    """Promise: a channel that cannot be suppressed or an address past the bound is a 422
    naming the field, and changes nothing."""
    status, problem, _ = await api.request(
        "DELETE", PATH + "in_app/someone/", user="admin-1", role="admin"
    )
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["channel"]
    status, problem, _ = await api.request(
        "DELETE", PATH + "email/" + "a" * 321 + "/", user="admin-1", role="admin"
    )
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["address"]
    # within the documented 1-320 characters but blank once trimmed (a control character
    # Python counts as space): no entry is ever listed under it, so 404, as the document says
    status, problem, _ = await api.request(
        "DELETE", PATH + "email/%1D/", user="admin-1", role="admin"
    )
    assert status == 404, problem
    status, problem, _ = await api.get(PATH + "?limit=100000", user="admin-1", role="admin")
    assert status == 422, problem
    assert [e["field"] for e in problem["errors"]] == ["limit"]


async def test_tenants_never_see_or_remove_each_others(api: Api, pool: asyncpg.Pool) -> None:
    """Promise: one tenant's suppression list is invisible to another, and another's admin
    cannot take an address off it (404, as a made-up one)."""
    await store.add(pool, "TEN-0001", "sms", E164, "sms_opt_out", "twilio 21610")
    assert [e["address"] for e in (await admin_get(api, PATH))[1]] == [E164]
    assert (await admin_get(api, PATH, tenant="TEN-0002"))[1] == []
    target = PATH + "sms/%2B917568992589/"
    status, _, _ = await api.request(
        "DELETE", target, tenant="TEN-0002", user="admin-1", role="admin"
    )
    assert status == 404
    assert [e["address"] for e in (await admin_get(api, PATH))[1]] == [E164]


# --- email -------------------------------------------------------------------------------------


async def test_a_listed_email_address_is_suppressed_without_calling_the_relay(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a send to a listed address ends `suppressed` with the reason and the relay
    never hears of it; a hard bounce stops a critical send too; a category's entry stops
    that category only, and not a critical one; another tenant's list changes nothing."""
    daemon = await start(daemon_factory, smtp_sink)
    await store.add(db, "TEN-0001", "email", "dead@example.com", "hard_bounce", "DSN 5.1.1")
    await store.add(
        db, "TEN-0001", "email", "ann@example.com", "unsubscribe", "one-click", category="digest"
    )
    await store.add(db, "TEN-0002", "email", "bob@example.com", "hard_bounce", "DSN 5.1.1")
    async with Api(daemon) as api:
        dead = (await send(api, recipient="Dead@Example.com", critical=True))["notification_id"]
        digest = (await send(api, recipient="ann@example.com", category="digest"))[
            "notification_id"
        ]
        other = (await send(api, recipient="ann@example.com", category="interview"))[
            "notification_id"
        ]
        urgent = (await send(api, recipient="ann@example.com", category="digest", critical=True))[
            "notification_id"
        ]
        bob = (await send(api, recipient="bob@example.com"))["notification_id"]
        record = await wait_status(db, dead, "suppressed")
        assert "suppression list" in record["last_error"]
        assert "hard_bounce" in record["last_error"]
        record = await wait_status(db, digest, "suppressed")
        assert "unsubscribe" in record["last_error"] and "digest" in record["last_error"]
        for sent in (other, urgent, bob):
            await wait_status(db, sent, "sent")
    assert sorted(r.notifyd_id or "" for r in smtp_sink.received) == sorted([other, urgent, bob])
    assert "dead@example.com" not in [a.lower() for a in smtp_sink.rcpts]
    assert (await row(db, dead))["attempts"] == 0


async def test_smtp_550_at_rcpt_suppresses_the_address_for_later_sends(
    daemon_factory: DaemonFactory, smtp_sink: SmtpSink, db: asyncpg.Connection
) -> None:
    """Promise: a relay's 550 5.1.1 at RCPT TO fails that delivery with the relay's words and
    puts the address on the list; the next send to it (even critical) ends `suppressed`
    without a second RCPT TO; a 5.7.1 policy refusal fails without suppressing."""
    smtp_sink.refuse_rcpt("nobody@example.com", "550 5.1.1 No such user here")
    smtp_sink.refuse_rcpt("spam@example.com", "550 5.7.1 Message rejected as spam")
    daemon = await start(daemon_factory, smtp_sink)
    async with Api(daemon) as api:
        first = (await send(api, recipient="nobody@example.com"))["notification_id"]
        record = await wait_status(db, first, "failed")
        assert "No such user here" in record["last_error"]
        assert "suppression list" in record["last_error"]
        policy = (await send(api, recipient="spam@example.com"))["notification_id"]
        await wait_status(db, policy, "failed")
        second = (await send(api, recipient="NOBODY@example.com", critical=True))["notification_id"]
        record = await wait_status(db, second, "suppressed")
        assert "smtp_refused" in record["last_error"]
        status, listed, _ = await admin_get(api, PATH)
    assert status == 200
    assert [(e["address"], e["reason"], e["notification_id"]) for e in listed] == [
        ("nobody@example.com", "smtp_refused", first)
    ]
    assert "No such user here" in listed[0]["source"]
    assert [a.lower() for a in smtp_sink.rcpts].count("nobody@example.com") == 1


# --- SMS ---------------------------------------------------------------------------------------


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioStandin]:
    async with TwilioStandin({SID: TOKEN}) as standin:
        yield standin


async def test_twilio_21610_suppresses_the_number_and_a_later_send_never_reaches_twilio(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: Twilio's 21610 (the number replied STOP) fails that message and puts the
    number on the list; a later send to it, even critical, ends `suppressed` without a
    request to Twilio."""
    twilio.fail_next(1, status=400, code=21610, message="Attempt to send to unsubscribed recipient")
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        first = await send_sms(api)
        record = await wait_sms_status(db, first, "failed")
        assert "21610" in record["last_error"]
        second = await send_sms(api, {**SEED_SMS, "critical": True})
        record = await wait_sms_status(db, second, "suppressed")
        assert "sms_opt_out" in record["last_error"]
        listed = (await admin_get(api, PATH))[1]
    assert [(e["channel"], e["address"], e["reason"]) for e in listed] == [
        ("sms", E164, "sms_opt_out")
    ]
    assert twilio.requests == 1


@pytest.mark.parametrize("how", ["error-code", "opt-out-type"])
async def test_a_stop_reported_by_the_status_callback_suppresses_the_number(
    daemon_factory: DaemonFactory,
    twilio: TwilioStandin,
    db: asyncpg.Connection,
    session: aiohttp.ClientSession,
    how: str,
) -> None:
    """Promise: a signed status callback saying the recipient opted out (ErrorCode 21610, or
    OptOutType=STOP) puts the row's number on the list; the next send is suppressed."""
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        first = await send_sms(api)
        await wait_sms_status(db, first, "sent")
        message = message_for(twilio, first)
        if how == "error-code":
            params = twilio.callback_params(
                message, "undelivered", error_code="21610", error_message="Unsubscribed recipient"
            )
        else:
            params = {**twilio.callback_params(message, "delivered"), "OptOutType": "STOP"}
        assert message.status_callback is not None
        answer = await post_signed(session, message.status_callback, params, TOKEN)
        assert answer == 204

        async def listed() -> bool:
            return bool((await admin_get(api, PATH))[1])

        await wait_for(listed)
        second = await send_sms(api)
        await wait_sms_status(db, second, "suppressed")
    assert len(twilio.messages) == 1


async def test_a_forged_stop_callback_suppresses_nothing(
    daemon_factory: DaemonFactory,
    twilio: TwilioStandin,
    db: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    """Promise: only an authentic callback changes the list (a forged STOP is 403)."""
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        first = await send_sms(api)
        await wait_sms_status(db, first, "sent")
        message = message_for(twilio, first)
        params = {**twilio.callback_params(message, "delivered"), "OptOutType": "STOP"}
        assert message.status_callback is not None
        answer = await post_signed(
            session, message.status_callback, params, TOKEN, signature="forged"
        )
        assert answer == 403
        assert (await admin_get(api, PATH))[1] == []
