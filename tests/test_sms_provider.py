"""SMS through Twilio: numbers reach it as E.164, and its answers become retry or fail.

The provider runs twilio's real client over HTTP against a local stand-in speaking Twilio's
Messages API (tests/twilio_standin.py), so what is checked is what goes over the wire.
"""

from __future__ import annotations

import gc
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from notifyd.ids import uuid7
from notifyd.providers.base import Delivery, PermanentError, TransientError
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.providers.sms import (
    NOT_CONFIGURED,
    TwilioCredentials,
    TwilioSmsProvider,
    parse_retry_after,
    status_callback_url,
)
from notifyd.settings import Settings
from tests.helpers import make_settings
from tests.twilio_standin import TwilioStandin

SID = "AC" + "1" * 32
TOKEN = "standin-auth-token"
FROM = "+14155552671"
PUBLIC_URL = "https://notifyd.example.com"


@dataclass(frozen=True)
class Creds:
    account_sid: str
    auth_token: str
    from_number: str


def settings_for(base_url: str, **env: str) -> Settings:
    # the provider touches neither database nor Redis: unreachable addresses on purpose
    return make_settings(
        "postgresql://nobody@127.0.0.1:1/none",
        "redis://127.0.0.1:1/0",
        TWILIO_API_BASE_URL=base_url,
        **env,
    )


def provider_for(
    settings: Settings, creds: TwilioCredentials | None, region: str = "US"
) -> TwilioSmsProvider:
    async def config_for(tenant_id: str) -> TwilioCredentials | None:
        return creds

    async def region_for(tenant_id: str) -> str:
        return region

    return TwilioSmsProvider(settings, config_for, region_for)


def delivery(recipient: str, body: str = "Your interview is tomorrow at 10 AM.") -> Delivery:
    return Delivery(
        id=str(uuid7()),
        tenant_id="TEN-0001",
        channel="sms",
        recipient=recipient,
        user_id=None,
        subject=None,
        body=body,
        html_body=None,
        category=None,
        attempt=1,
        created_at=datetime.now(UTC),
    )


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioStandin]:
    async with TwilioStandin({SID: TOKEN}) as standin:
        yield standin


@pytest.fixture
async def sms(twilio: TwilioStandin) -> AsyncIterator[TwilioSmsProvider]:
    settings = settings_for(twilio.base_url, NOTIFYD_PUBLIC_URL=PUBLIC_URL)
    provider = provider_for(settings, Creds(SID, TOKEN, FROM))
    try:
        yield provider
    finally:
        await provider.close()


# -- phone numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("number", "region", "e164"),
    [
        ("7568992589", "IN", "+917568992589"),  # the first seed's own example, an Indian mobile
        ("+447911123456", "US", "+447911123456"),
        ("+44 7911 123456", "IN", "+447911123456"),
        ("07911 123456", "GB", "+447911123456"),
        ("011 44 7911 123456", "US", "+447911123456"),
        ("(415) 555-2671", "US", "+14155552671"),
        ("  +1 415-555-2671 ", "gb", "+14155552671"),
    ],
)
def test_numbers_become_e164_read_in_the_default_region(
    number: str, region: str, e164: str
) -> None:
    assert to_e164(number, region) == e164


@pytest.mark.parametrize(
    "number", ["12", "abc", "", "+999 123", "4155552671 ext. 12", "0044 7911 123456"]
)
def test_what_is_not_a_phone_number_is_refused_with_the_reason(number: str) -> None:
    with pytest.raises(InvalidPhone, match=r"region US|extension"):
        to_e164(number, "US")


def test_a_national_number_invalid_in_the_region_names_the_setting_to_fix() -> None:
    # 7568992589 has a possible US length but no US area code 756: it is not sent to +1…
    with pytest.raises(InvalidPhone, match="default_region") as caught:
        to_e164("7568992589", "US")
    assert "'7568992589' is not a valid phone number in region US" in str(caught.value)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = parse_retry_after(later)
    assert seconds is not None
    assert 25 <= seconds <= 30
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(past) == 0.0


# -- sending ---------------------------------------------------------------------------------


async def test_the_seed_example_reaches_twilio_as_e164_with_body_and_status_callback(
    twilio: TwilioStandin,
) -> None:
    settings = settings_for(twilio.base_url, NOTIFYD_PUBLIC_URL=PUBLIC_URL + "/")
    provider = provider_for(settings, Creds(SID, TOKEN, FROM), region="IN")
    item = delivery("7568992589")
    try:
        sent = await provider.send(item)
    finally:
        await provider.close()
    [message] = twilio.messages
    assert message.to == "+917568992589"
    assert message.from_ == FROM
    assert message.body == "Your interview is tomorrow at 10 AM."
    assert message.account_sid == SID
    assert message.status_callback == status_callback_url(PUBLIC_URL, "TEN-0001", item.id)
    assert message.status_callback == (
        f"{PUBLIC_URL}/webhooks/twilio/status?tenant=TEN-0001&notification={item.id}"
    )
    assert sent.provider_message_id == message.sid
    assert message.sid.startswith("SM")
    assert len(message.sid) == 34
    assert sent.provider_status == "queued"


async def test_a_national_sender_number_is_normalised_and_no_callback_without_public_url(
    twilio: TwilioStandin,
) -> None:
    provider = provider_for(settings_for(twilio.base_url), Creds(SID, TOKEN, "(415) 555-2671"))
    try:
        await provider.send(delivery("+44 7911 123456"))
        await provider.send(delivery("202-555-0143"))
    finally:
        await provider.close()
    assert [(m.to, m.from_) for m in twilio.messages] == [
        ("+447911123456", FROM),
        ("+12025550143", FROM),
    ]
    assert all("StatusCallback" not in m.form for m in twilio.messages)


async def test_an_unreadable_recipient_fails_for_good_before_calling_twilio(
    twilio: TwilioStandin, sms: TwilioSmsProvider
) -> None:
    with pytest.raises(PermanentError, match="recipient: '12' is not a phone number"):
        await sms.send(delivery("12"))
    assert twilio.requests == 0


async def test_429_with_retry_after_is_transient_and_carries_the_wait(
    twilio: TwilioStandin, sms: TwilioSmsProvider
) -> None:
    twilio.fail_next(status=429, retry_after="1")
    with pytest.raises(TransientError) as caught:
        await sms.send(delivery("+14155550123"))
    assert caught.value.retry_after == 1.0
    assert "429" in caught.value.reason
    assert "20429" in caught.value.reason
    # Twilio is fine again: the next attempt goes through
    sent = await sms.send(delivery("+14155550123"))
    assert sent.provider_message_id == twilio.messages[0].sid


async def test_5xx_is_transient(twilio: TwilioStandin, sms: TwilioSmsProvider) -> None:
    twilio.fail_next(status=500)
    with pytest.raises(TransientError) as caught:
        await sms.send(delivery("+14155550123"))
    assert caught.value.retry_after is None
    assert caught.value.reason.startswith("twilio 500 error 20500")
    twilio.fail_next(status=503, retry_after="7")
    with pytest.raises(TransientError) as again:
        await sms.send(delivery("+14155550123"))
    assert again.value.retry_after == 7.0


async def test_an_invalid_number_per_twilio_fails_for_good_with_its_code(
    twilio: TwilioStandin, sms: TwilioSmsProvider
) -> None:
    twilio.fail_next(status=400, code=21211, message="Invalid 'To' Phone Number: +14155550123")
    with pytest.raises(PermanentError) as caught:
        await sms.send(delivery("+14155550123"))
    assert "21211" in caught.value.reason
    assert "Invalid 'To' Phone Number" in caught.value.reason
    twilio.fail_next(status=400, code=21614, message="'To' number is not a valid mobile number")
    with pytest.raises(PermanentError, match="21614"):
        await sms.send(delivery("+14155550123"))
    assert twilio.messages == []


async def test_bad_credentials_fail_for_good(twilio: TwilioStandin) -> None:
    provider = provider_for(settings_for(twilio.base_url), Creds(SID, "wrong-token", FROM))
    try:
        with pytest.raises(PermanentError) as caught:
            await provider.send(delivery("+14155550123"))
    finally:
        await provider.close()
    assert "401" in caught.value.reason
    assert "20003" in caught.value.reason
    assert twilio.messages == []


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_twilio_unreachable_is_transient() -> None:
    base_url = f"http://127.0.0.1:{_closed_port()}"
    provider = provider_for(settings_for(base_url), Creds(SID, TOKEN, FROM))
    try:
        with pytest.raises(TransientError, match="twilio unreachable"):
            await provider.send(delivery("+14155550123"))
    finally:
        await provider.close()


async def test_twilio_too_slow_is_transient(twilio: TwilioStandin) -> None:
    twilio.stall = 10.0
    provider = provider_for(
        settings_for(twilio.base_url, NOTIFYD_SEND_TIMEOUT="0.3"), Creds(SID, TOKEN, FROM)
    )
    try:
        with pytest.raises(TransientError, match=r"did not answer within 0\.3s"):
            await provider.send(delivery("+14155550123"))
    finally:
        await provider.close()


@pytest.mark.parametrize("creds", [None, Creds(SID, TOKEN, ""), Creds("", "", "")])
async def test_sms_not_configured_fails_for_good(
    twilio: TwilioStandin, creds: Creds | None
) -> None:
    provider = provider_for(settings_for(twilio.base_url), creds)
    with pytest.raises(PermanentError) as caught:
        await provider.send(delivery("+14155550123"))
    await provider.close()
    assert caught.value.reason == NOT_CONFIGURED
    assert twilio.requests == 0


async def test_an_unreadable_sender_number_fails_for_good(twilio: TwilioStandin) -> None:
    provider = provider_for(settings_for(twilio.base_url), Creds(SID, TOKEN, "not-a-number"))
    with pytest.raises(PermanentError, match=r"sender .*TWILIO_PHONE"):
        await provider.send(delivery("+14155550123"))
    await provider.close()


async def test_one_client_per_account_reused_and_every_session_closed(
    twilio: TwilioStandin,
) -> None:
    other_sid = "AC" + "2" * 32
    twilio.accounts[other_sid] = "other-token"
    accounts = {"TEN-A": Creds(SID, TOKEN, FROM), "TEN-B": Creds(other_sid, "other-token", FROM)}

    async def config_for(tenant_id: str) -> TwilioCredentials | None:
        return accounts[tenant_id]

    async def region_for(tenant_id: str) -> str:
        return "US"

    provider = TwilioSmsProvider(settings_for(twilio.base_url), config_for, region_for)
    for tenant in ("TEN-A", "TEN-B", "TEN-A", "TEN-B"):
        item = delivery("+14155550123")
        await provider.send(Delivery(**{**_fields(item), "tenant_id": tenant}))
    assert [m.account_sid for m in twilio.messages] == [SID, other_sid, SID, other_sid]
    sessions = [http.session for _client, http in provider._clients.values()]
    assert len(sessions) == 2
    await provider.close()
    assert all(session.closed for session in sessions)
    del sessions
    gc.collect()  # an unclosed aiohttp session would warn here, and warnings are errors


def _fields(item: Delivery) -> dict[str, object]:
    return {name: getattr(item, name) for name in Delivery.__slots__}
