"""SMS end to end: daemon → sms sender → Twilio's Messages API (a local stand-in) → callbacks.

Each test runs a real daemon whose `TWILIO_API_BASE_URL` points at `tests/twilio_standin.py`,
a real HTTP server answering as Twilio does (basic auth per account, 201 message resources,
scripted 429/500/400 errors, signed status callbacks). NOTIFYD_PUBLIC_URL is the daemon's own
address, so the stand-in posts status callbacks straight back to it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from scripts.localservers import free_port
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.twilio_standin import Message, TwilioStandin, sign

SID = "AC" + "5a" * 16
TOKEN = "global-twilio-auth-token"
TENANT_SID = "AC" + "0123456789abcdef" * 2
TENANT_TOKEN = "tenant-own-twilio-auth-token"
TENANT_FROM = "+14155550100"
SECRET_KEY = "tenant-secret-key-for-sms-tests"
# The first seed's own example: a national Indian number, and a national TWILIO_PHONE too.
SEED_SMS = {
    "notification_type": "sms",
    "message": "Interview tomorrow at 10 AM.",
    "recipient": "7568992589",
}
TWILIO_PHONE = "9876543210"
SMS_SID = re.compile(r"SM[0-9a-f]{32}")

ROW = """
SELECT status, attempts, last_error, provider_message_id, provider_status, next_attempt_at,
       updated_at, sent_at, delivered_at
FROM notifications WHERE id = $1::uuid
"""


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioStandin]:
    async with TwilioStandin({SID: TOKEN, TENANT_SID: TENANT_TOKEN}) as standin:
        yield standin


async def sms_daemon(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, region: str = "IN", **env: str
) -> Daemon:
    """A daemon on a port known in advance, so NOTIFYD_PUBLIC_URL can name it."""
    port = free_port()
    settings: dict[str, str] = {
        "NOTIFYD_PORT": str(port),
        "NOTIFYD_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TWILIO_ACCOUNT_SID": SID,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "TWILIO_PHONE": TWILIO_PHONE,
        "TWILIO_API_BASE_URL": twilio.base_url,
        "NOTIFYD_DEFAULT_REGION": region,
        "NOTIFYD_RETRY_BASE": "0.05",
        "NOTIFYD_RETRY_CAP": "2",
        "NOTIFYD_CLAIM_IDLE": "2",
        "NOTIFYD_SEND_TIMEOUT": "1",
        "NOTIFYD_REQUEUE_AFTER": "1",
        "NOTIFYD_SWEEP_INTERVAL": "0.2",
        **env,
    }
    daemon = await daemon_factory(**settings)
    assert daemon.port == port
    return daemon


async def send_sms(api: Api, body: dict[str, Any] | None = None, **kw: Any) -> str:
    status, answer, _ = await api.post(
        "/notifications/send/", body or SEED_SMS, role=kw.pop("role", "service"), **kw
    )
    assert status == 202, answer
    return str(answer["notification_id"])


async def row(db: asyncpg.Connection, notification_id: str) -> dict[str, Any]:
    found = await db.fetchrow(ROW, notification_id)
    assert found is not None
    return dict(found)


async def wait_status(
    db: asyncpg.Connection, notification_id: str, status: str, timeout: float = 15
) -> dict[str, Any]:
    async def reached() -> bool:
        return bool((await row(db, notification_id))["status"] == status)

    await wait_for(reached, timeout=timeout)
    return await row(db, notification_id)


def message_for(twilio: TwilioStandin, notification_id: str) -> Message:
    """The stand-in's message whose StatusCallback names this notification."""
    found = [m for m in twilio.messages if notification_id in (m.status_callback or "")]
    assert len(found) == 1, [m.status_callback for m in twilio.messages]
    return found[0]


async def test_seed_example_reaches_twilio_as_e164_and_row_records_the_message_sid(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: the first seed's national number (region IN) reaches Twilio as E.164, once."""
    daemon = await sms_daemon(daemon_factory, twilio, region="IN")
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        stored = await wait_status(db, notification_id, "sent")

        [message] = twilio.messages
        assert message.to == "+917568992589"
        assert message.from_ == "+919876543210"
        assert message.body == "Interview tomorrow at 10 AM."
        assert message.account_sid == SID
        assert message.status_callback is not None
        assert message.status_callback.startswith(
            f"http://127.0.0.1:{daemon.port}/webhooks/twilio/status?"
        )
        assert SMS_SID.fullmatch(message.sid)
        assert stored["provider_message_id"] == message.sid
        assert stored["attempts"] == 1

        status, detail, _ = await api.get(f"/notifications/{notification_id}/", role="service")
        assert status == 200
        assert detail["status"] == "sent"
        assert detail["recipient"] == "+917568992589"
        assert detail["provider_message_id"] == message.sid
        assert detail["is_sent"] is True


async def test_seed_number_in_region_us_is_a_422_naming_recipient(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: a number that cannot be read in the region is a clear error, nothing stored."""
    daemon = await sms_daemon(daemon_factory, twilio, region="US")
    async with Api(daemon) as api:
        status, problem, headers = await api.post("/notifications/send/", SEED_SMS, role="service")
    assert status == 422, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert [e["field"] for e in problem["errors"]] == ["recipient"]
    assert await db.fetchval("SELECT count(*) FROM notifications") == 0
    assert twilio.requests == 0


async def test_429_with_retry_after_is_retried_after_that_delay_and_sent_once(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: Twilio 429 is transient; its Retry-After sets the next attempt; one message."""
    twilio.fail_next(1, status=429, retry_after="1")
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        retrying = await wait_status(db, notification_id, "retrying")
        assert retrying["attempts"] == 1
        assert "429" in retrying["last_error"]
        wait = (retrying["next_attempt_at"] - retrying["updated_at"]).total_seconds()
        assert 0.8 <= wait <= 1.3, wait  # Retry-After: 1, not the 0.05 s backoff

        sent = await wait_status(db, notification_id, "sent")
        assert sent["attempts"] == 2
        assert (sent["sent_at"] - retrying["updated_at"]).total_seconds() >= 0.8
        assert twilio.requests == 2
        [message] = twilio.messages
        assert sent["provider_message_id"] == message.sid


async def test_500_then_success_is_sent_on_the_second_attempt(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: Twilio 5xx is transient: retried with backoff, then sent, once."""
    twilio.fail_next(1, status=500)
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        sent = await wait_status(db, notification_id, "sent")
    assert sent["attempts"] == 2
    assert sent["last_error"] is None
    assert twilio.requests == 2
    assert len(twilio.messages) == 1


async def test_invalid_number_21211_fails_at_once_with_the_reason(
    daemon_factory: DaemonFactory,
    twilio: TwilioStandin,
    db: asyncpg.Connection,
    redis_url: str,
) -> None:
    """Promise: a permanent Twilio error (400, 21211) fails the delivery without a retry."""
    twilio.fail_next(1, status=400, code=21211, message="Invalid 'To' Phone Number")
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        failed = await wait_status(db, notification_id, "failed")
        assert failed["attempts"] == 1
        assert "21211" in failed["last_error"]
        assert failed["next_attempt_at"] is None
        status, detail, _ = await api.get(f"/notifications/{notification_id}/", role="service")
        assert status == 200
        assert detail["status"] == "failed"
        assert "21211" in detail["last_error"]
    assert twilio.requests == 1
    assert twilio.messages == []
    redis = Redis.from_url(redis_url)
    try:
        dead: Any = await redis.xrange("notifyd:dead")
    finally:
        await redis.aclose()
    assert [f[b"id"].decode() for _, f in dead] == [notification_id]
    assert b"21211" in dead[0][1][b"reason"]


async def test_signed_delivered_callback_marks_the_notification_delivered(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: Twilio's signed status callback moves a sent SMS to delivered."""
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        await wait_status(db, notification_id, "sent")
        message = message_for(twilio, notification_id)

        assert await twilio.send_status(message, "delivered") == 204
        status, detail, _ = await api.get(f"/notifications/{notification_id}/", role="service")
    assert status == 200
    assert detail["status"] == "delivered"
    assert detail["provider_status"] == "delivered"
    assert detail["delivered_at"] is not None
    assert detail["is_sent"] is True


async def test_forged_callback_is_403_and_changes_nothing(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: a status callback with a bad X-Twilio-Signature is refused and ignored."""
    daemon = await sms_daemon(daemon_factory, twilio)
    async with Api(daemon) as api:
        notification_id = await send_sms(api)
        before = await wait_status(db, notification_id, "sent")
        message = message_for(twilio, notification_id)

        forged = await twilio.send_status(message, "delivered", signature="bm90IGEgc2lnbmF0dXJl")
        assert forged == 403
        # signed, but with a token that is not this account's: just as forged
        assert message.status_callback is not None
        params = twilio.callback_params(message, "delivered")
        wrong = sign(TENANT_TOKEN, message.status_callback, params)
        assert await twilio.send_status(message, "delivered", signature=wrong) == 403
        # no signature at all
        assert await twilio.send_status(message, "undelivered", signature="") == 403
    assert await row(db, notification_id) == before
    assert before["delivered_at"] is None


async def put_tenant_twilio(api: Api, tenant: str, region: str | None = "US") -> None:
    body = {
        "twilio": {
            "account_sid": TENANT_SID,
            "auth_token": TENANT_TOKEN,
            "from_number": TENANT_FROM,
        },
        "default_region": region,
    }
    status, answer, _ = await api.request(
        "PUT", "/tenants/current/settings/", json=body, tenant=tenant, user="admin-1", role="admin"
    )
    assert status == 200, answer
    assert answer["twilio"]["auth_token_set"] is True


async def test_tenant_with_own_twilio_account_sends_with_its_credentials(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: per-tenant Twilio settings (SID, token, from, region) replace TWILIO_*."""
    daemon = await sms_daemon(daemon_factory, twilio, NOTIFYD_TENANT_SECRET_KEY=SECRET_KEY)
    async with Api(daemon) as api:
        await put_tenant_twilio(api, "TEN-0001", region="US")
        own = await send_sms(
            api,
            {
                "notification_type": "sms",
                "message": "Offer letter sent.",
                "recipient": "4155550123",
            },
            tenant="TEN-0001",
        )
        other = await send_sms(api, tenant="TEN-0002")  # no settings: the global account
        await wait_status(db, own, "sent")
        await wait_status(db, other, "sent")

    # The stand-in records a message under an account only when the request's basic auth was
    # that account's (login == SID in the URL, password == its token).
    tenant_message = message_for(twilio, own)
    assert tenant_message.account_sid == TENANT_SID
    assert tenant_message.from_ == TENANT_FROM
    assert tenant_message.to == "+14155550123"  # national, read in the tenant's region US
    global_message = message_for(twilio, other)
    assert global_message.account_sid == SID
    assert global_message.to == "+917568992589"  # the global region IN
    assert global_message.from_ == "+919876543210"


async def test_tenant_own_account_callback_is_checked_with_its_token(
    daemon_factory: DaemonFactory, twilio: TwilioStandin, db: asyncpg.Connection
) -> None:
    """Promise: a tenant's callbacks are checked with its own account's token (the global
    one no longer signs for it), and accepted when signed with it."""
    daemon = await sms_daemon(daemon_factory, twilio, NOTIFYD_TENANT_SECRET_KEY=SECRET_KEY)
    async with Api(daemon) as api:
        await put_tenant_twilio(api, "TEN-0001")
        notification_id = await send_sms(
            api,
            {"notification_type": "sms", "message": "Hi", "recipient": "+14155550123"},
            tenant="TEN-0001",
        )
        await wait_status(db, notification_id, "sent")
        message = message_for(twilio, notification_id)
        assert message.account_sid == TENANT_SID
        assert message.status_callback is not None
        params = twilio.callback_params(message, "delivered")
        global_signed = sign(TOKEN, message.status_callback, params)
        assert await twilio.send_status(message, "delivered", signature=global_signed) == 403
        assert (await row(db, notification_id))["status"] == "sent"
        # the stand-in signs with the account's own token, as Twilio does
        assert await twilio.send_status(message, "delivered") == 204
    assert (await row(db, notification_id))["status"] == "delivered"
