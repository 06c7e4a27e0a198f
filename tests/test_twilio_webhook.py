"""Twilio status callbacks: only signed ones count, out-of-order ones change nothing.

Each test runs the daemon and posts callbacks the way Twilio does (form fields, signed with
`X-Twilio-Signature` over the URL Twilio was given). The daemon sits "behind a proxy": Twilio
knows it as NOTIFYD_PUBLIC_URL, the tests reach it on its local port.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from notifyd.app import Daemon
from notifyd.ids import uuid7
from notifyd.providers.base import Delivery
from notifyd.providers.sms import TwilioCredentials, TwilioSmsProvider, status_callback_url
from notifyd.store import deliveries
from tests.conftest import DaemonFactory
from tests.twilio_standin import TwilioStandin, post_signed, sign

SID = "AC" + "3" * 32
TOKEN = "webhook-test-auth-token"
PUBLIC_URL = "https://notifyd.example.com"
TENANT = "TEN-0001"
MESSAGE_SID = "SM" + "a" * 32

INSERT_SMS = """
INSERT INTO notifications (id, tenant_id, created_by, channel, recipient, body, status,
                           attempts, provider_message_id, sent_at)
VALUES ($1, $2, 'backend', 'sms', '+14155550123', 'Your interview is tomorrow.', $3, 1, $4,
        CASE WHEN $3 = 'sent' THEN now() END)
"""
ROW = """
SELECT status, provider_status, provider_message_id, delivered_at, last_error, updated_at
FROM notifications WHERE id = $1
"""


@pytest.fixture
async def daemon(daemon_factory: DaemonFactory) -> Daemon:
    return await daemon_factory(
        TWILIO_ACCOUNT_SID=SID, TWILIO_AUTH_TOKEN=TOKEN, NOTIFYD_PUBLIC_URL=PUBLIC_URL
    )


async def insert_sms(
    db: asyncpg.Connection,
    status: str = "sent",
    tenant: str = TENANT,
    provider_message_id: str | None = MESSAGE_SID,
) -> uuid.UUID:
    notification_id = uuid7()
    await db.execute(INSERT_SMS, notification_id, tenant, status, provider_message_id)
    return notification_id


async def row(db: asyncpg.Connection, notification_id: uuid.UUID) -> dict[str, Any]:
    found = await db.fetchrow(ROW, notification_id)
    assert found is not None
    return dict(found)


def params(status: str, message_sid: str = MESSAGE_SID, **extra: str) -> dict[str, str]:
    return {
        "AccountSid": SID,
        "ApiVersion": "2010-04-01",
        "From": "+14155552671",
        "MessageSid": message_sid,
        "MessageStatus": status,
        "SmsSid": message_sid,
        "SmsStatus": status,
        "To": "+14155550123",
        **extra,
    }


Callback = Callable[..., Any]


@pytest.fixture
def callback(daemon: Daemon, session: aiohttp.ClientSession) -> Callback:
    """Post a status callback for one notification as Twilio would; returns the status."""

    async def post(
        notification_id: uuid.UUID | str,
        status: str,
        *,
        tenant: str = TENANT,
        token: str = TOKEN,
        signature: str | None = None,
        **extra: str,
    ) -> int:
        public = status_callback_url(PUBLIC_URL, tenant, str(notification_id))
        local = public.replace(PUBLIC_URL, f"http://127.0.0.1:{daemon.port}")
        return await post_signed(
            session,
            local,
            params(status, **extra),
            token,
            signed_url=public,
            signature=signature,
        )

    return post


async def test_delivered_callback_marks_the_sms_delivered(
    db: asyncpg.Connection, callback: Callback
) -> None:
    notification_id = await insert_sms(db)
    assert await callback(notification_id, "delivered") == 204
    after = await row(db, notification_id)
    assert after["status"] == "delivered"
    assert after["provider_status"] == "delivered"
    assert after["delivered_at"] is not None
    assert after["last_error"] is None


async def test_an_older_callback_after_delivered_changes_nothing(
    db: asyncpg.Connection, callback: Callback
) -> None:
    notification_id = await insert_sms(db)
    assert await callback(notification_id, "delivered") == 204
    delivered = await row(db, notification_id)
    for late in ("sent", "sending", "queued"):
        assert await callback(notification_id, late) == 204  # Twilio needs no more than that
    assert await row(db, notification_id) == delivered


async def test_undelivered_and_failed_record_twilios_error_code(
    db: asyncpg.Connection, callback: Callback
) -> None:
    undelivered = await insert_sms(db)
    assert await callback(undelivered, "undelivered", ErrorCode="30003") == 204
    after = await row(db, undelivered)
    assert after["status"] == "undelivered"
    assert after["provider_status"] == "undelivered"
    assert "30003" in after["last_error"]
    assert after["delivered_at"] is None

    failed = await insert_sms(db)
    status = await callback(
        failed, "failed", ErrorCode="30006", ErrorMessage="Landline or unreachable carrier"
    )
    assert status == 204
    after = await row(db, failed)
    assert after["status"] == "undelivered"
    assert after["last_error"] == "twilio 30006: Landline or unreachable carrier"


async def test_a_bad_or_missing_signature_is_403_and_changes_nothing(
    db: asyncpg.Connection,
    callback: Callback,
    daemon: Daemon,
    session: aiohttp.ClientSession,
) -> None:
    notification_id = await insert_sms(db)
    before = await row(db, notification_id)
    assert await callback(notification_id, "delivered", signature="bm90IGEgc2lnbmF0dXJl") == 403
    assert await callback(notification_id, "delivered", token="another-accounts-token") == 403
    # signed for the local URL, not the one Twilio was given: not what Twilio would send
    url = (
        f"http://127.0.0.1:{daemon.port}/webhooks/twilio/status"
        f"?tenant={TENANT}&notification={notification_id}"
    )
    assert await post_signed(session, url, params("delivered"), TOKEN) == 403
    async with session.post(url, data=params("delivered")) as response:  # no signature at all
        assert response.status == 403
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)
    assert "X-Twilio-Signature" in problem["detail"]
    assert await row(db, notification_id) == before


async def test_a_tampered_field_breaks_the_signature(
    db: asyncpg.Connection, daemon: Daemon, session: aiohttp.ClientSession
) -> None:
    notification_id = await insert_sms(db)
    before = await row(db, notification_id)
    public = status_callback_url(PUBLIC_URL, TENANT, str(notification_id))
    local = public.replace(PUBLIC_URL, f"http://127.0.0.1:{daemon.port}")
    signature = sign(TOKEN, public, params("undelivered", ErrorCode="30003"))
    async with session.post(
        local,
        data=params("delivered"),  # the signed form said undelivered
        headers={"X-Twilio-Signature": signature},
    ) as response:
        assert response.status == 403
    assert await row(db, notification_id) == before


async def test_a_callback_while_still_sending_keeps_the_stage_for_the_sender(
    db: asyncpg.Connection, callback: Callback
) -> None:
    # Twilio can report before the sender has recorded its answer: the row stays `sending`
    notification_id = await insert_sms(db, status="sending", provider_message_id=None)
    assert await callback(notification_id, "delivered") == 204
    after = await row(db, notification_id)
    assert after["status"] == "sending"
    assert after["provider_status"] == "delivered"
    # ... and when the sender records the send, the delivery is already known
    assert await deliveries.mark_sent(db, TENANT, notification_id, 1, MESSAGE_SID, "queued")
    after = await row(db, notification_id)
    assert after["status"] == "delivered"
    assert after["provider_message_id"] == MESSAGE_SID


async def test_another_tenants_notification_is_not_touched(
    db: asyncpg.Connection, callback: Callback
) -> None:
    theirs = await insert_sms(db, tenant="TEN-OTHER")
    before = await row(db, theirs)
    assert await callback(theirs, "delivered", tenant=TENANT) == 204
    assert await row(db, theirs) == before


async def test_a_callback_for_another_message_of_the_same_notification_is_ignored(
    db: asyncpg.Connection, callback: Callback
) -> None:
    notification_id = await insert_sms(db)
    before = await row(db, notification_id)
    assert await callback(notification_id, "delivered", message_sid="SM" + "b" * 32) == 204
    assert await callback(uuid7(), "delivered") == 204  # no such notification at all
    assert await row(db, notification_id) == before


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("notification={id}", "tenant"),
        ("tenant=TEN-0001", "notification"),
        ("tenant=TEN-0001&notification=not-a-uuid", "notification"),
        ("tenant=bad%20tenant&notification={id}", "tenant"),
    ],
)
async def test_a_callback_url_without_its_ids_is_400_naming_the_parameter(
    daemon: Daemon, session: aiohttp.ClientSession, query: str, field: str
) -> None:
    path = "/webhooks/twilio/status?" + query.format(id=uuid7())
    url = f"http://127.0.0.1:{daemon.port}{path}"
    status = await post_signed(
        session, url, params("delivered"), TOKEN, signed_url=PUBLIC_URL + path
    )
    assert status == 400
    async with session.post(url, data=params("delivered")) as response:
        assert response.status == 400
        assert response.content_type == "application/problem+json"
        problem = await response.json(content_type=None)
    assert [error["field"] for error in problem["errors"]] == [field]


async def test_without_public_url_the_request_url_is_what_was_signed(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    local = await daemon_factory(TWILIO_ACCOUNT_SID=SID, TWILIO_AUTH_TOKEN=TOKEN)
    notification_id = await insert_sms(db)
    url = status_callback_url(f"http://127.0.0.1:{local.port}", TENANT, str(notification_id))
    assert await post_signed(session, url, params("delivered"), TOKEN) == 204
    assert (await row(db, notification_id))["status"] == "delivered"


async def test_no_auth_token_configured_refuses_every_callback(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, session: aiohttp.ClientSession
) -> None:
    local = await daemon_factory()
    notification_id = await insert_sms(db)
    url = status_callback_url(f"http://127.0.0.1:{local.port}", TENANT, str(notification_id))
    assert await post_signed(session, url, params("delivered"), "") == 403
    assert (await row(db, notification_id))["status"] == "sent"


async def test_the_providers_status_callback_comes_back_and_is_applied(
    daemon: Daemon, db: asyncpg.Connection
) -> None:
    """End to end: the URL the provider gave Twilio, called by Twilio (the stand-in)."""
    async with TwilioStandin({SID: TOKEN}) as twilio:
        settings = dataclasses.replace(daemon.settings, twilio_base_url=twilio.base_url)
        provider = TwilioSmsProvider(settings, _global_account, _us)
        notification_id = await insert_sms(db, status="sending", provider_message_id=None)
        try:
            sent = await provider.send(
                Delivery(
                    id=str(notification_id),
                    tenant_id=TENANT,
                    channel="sms",
                    recipient="(415) 555-0123",
                    user_id=None,
                    subject=None,
                    body="Your interview is tomorrow.",
                    html_body=None,
                    category=None,
                    attempt=1,
                    created_at=None,
                )
            )
        finally:
            await provider.close()
        assert await deliveries.mark_sent(
            db, TENANT, notification_id, 1, sent.provider_message_id, sent.provider_status
        )
        [message] = twilio.messages
        local = f"http://127.0.0.1:{daemon.port}"
        assert message.status_callback is not None
        status = await twilio.send_status(
            message, "delivered", url=message.status_callback.replace(PUBLIC_URL, local)
        )
    assert status == 204
    after = await row(db, notification_id)
    assert after["status"] == "delivered"
    assert after["provider_message_id"] == message.sid


@dataclass(frozen=True)
class Creds:
    account_sid: str
    auth_token: str
    from_number: str


async def _global_account(tenant_id: str) -> TwilioCredentials | None:
    return Creds(SID, TOKEN, "+14155552671")


async def _us(tenant_id: str) -> str:
    return "US"
