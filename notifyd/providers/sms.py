"""SMS through Twilio's Messages API, with twilio's own client on its aiohttp transport.

Per tenant: the credentials and sender number come from `config_for` (the tenant's own Twilio
settings, else the global `TWILIO_*`), and national numbers are read in the region from
`region_for`. One `twilio.rest.Client` (and so one aiohttp session, one connection pool) is
kept per (account SID, auth token): tenants sharing the global account share its connections,
and a rotated token simply gets a fresh client.

`TWILIO_API_BASE_URL` points the client at another host speaking the same API (the test
stand-in, a proxy). twilio builds every URL from its domain's `base_url` at request time
(`Domain.absolute_url`), so replacing `client.api.base_url` is enough; edge/region rewriting
(`TWILIO_EDGE`/`TWILIO_REGION` in the environment) is switched off for such a client, since
it would rewrite the host back to `api.<edge>.<region>.twilio.com`.

Errors become the two kinds the sender understands: 429 and 5xx are worth retrying, and
honour Twilio's `Retry-After`; any other 4xx (an invalid or non-mobile number, bad
credentials) cannot succeed on retry. twilio's exceptions drop the response headers, so the
`Retry-After` of an error response is kept by a thin subclass of its transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlencode

import aiohttp
from twilio.base.exceptions import (
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from notifyd.providers.base import (
    Delivery,
    PermanentError,
    RecipientRefused,
    Route,
    Sent,
    TransientError,
    Unreachable,
)
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.settings import Settings
from notifyd.suppressions import TWILIO_OPTED_OUT

STATUS_CALLBACK_PATH = "/webhooks/twilio/status"
NOT_CONFIGURED = (
    "SMS is not configured: set TWILIO_ACCOUNT_SID/TWILIO_AUTH_TOKEN/TWILIO_PHONE "
    "or the tenant's twilio settings"
)

# twilio logs eight INFO lines per request (URL, headers); our own log line says enough.
_TWILIO_HTTP_LOG = logging.getLogger("notifyd.providers.sms.twilio_http")
_TWILIO_HTTP_LOG.setLevel(logging.WARNING)


class TwilioCredentials(Protocol):
    """What the provider needs of a tenant's Twilio settings (`store.tenants.TwilioConfig`)."""

    @property
    def account_sid(self) -> str: ...

    @property
    def auth_token(self) -> str: ...

    @property
    def from_number(self) -> str: ...


ConfigFor = Callable[[str], Awaitable[TwilioCredentials | None]]
RegionFor = Callable[[str], Awaitable[str]]


def status_callback_url(public_url: str, tenant_id: str, notification_id: str) -> str:
    """Where Twilio reports this message's progress; the webhook reads both ids back."""
    query = urlencode({"tenant": tenant_id, "notification": notification_id})
    return f"{public_url.rstrip('/')}{STATUS_CALLBACK_PATH}?{query}"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(seconds, 0.0) if seconds == seconds else None  # NaN is no answer


@dataclass(slots=True)
class _RetryAfter:
    """Filled by the transport for the send that owns it (one per `send` call)."""

    seconds: float | None = None


# The send in progress on this task; a shared box, so the transport can fill it from any context.
_CAPTURE: contextvars.ContextVar[_RetryAfter | None] = contextvars.ContextVar(
    "notifyd_twilio_retry_after", default=None
)


class _Transport(AsyncTwilioHttpClient):  # type: ignore[misc]
    """twilio's aiohttp transport with two changes, both at its one `request` method.

    - Basic auth travels as a ready `Authorization` header: twilio builds `aiohttp.BasicAuth`,
      which aiohttp 3.14 deprecates (a DeprecationWarning on every request).
    - An error response's `Retry-After` is kept for the send in progress, because twilio's
      exceptions are built from status and body alone.
    """

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (twilio calls this signature)
        allow_redirects: bool = False,
    ) -> Any:
        if auth is not None:
            headers = {**(headers or {}), "Authorization": _basic_auth(*auth)}
        response = await super().request(
            method, url, params, data, headers, None, timeout, allow_redirects
        )
        box = _CAPTURE.get()
        status = response.status_code
        if box is not None and (status == 429 or status >= 500):
            box.seconds = parse_retry_after((response.headers or {}).get("Retry-After"))
        return response


def _basic_auth(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode("ascii")


def _new_client(account_sid: str, auth_token: str, base_url: str) -> tuple[Any, _Transport]:
    """A twilio Client on its aiohttp transport; must run inside the event loop."""
    http = _Transport(logger=_TWILIO_HTTP_LOG)
    client = Client(account_sid, auth_token, account_sid=account_sid, http_client=http)
    if base_url:
        client.api.base_url = base_url.rstrip("/")
        client.edge = None
        client.region = None
    return client, http


def _twilio_reason(exc: Any) -> tuple[int, str]:
    """(HTTP status, `twilio <status> error <code>: <message>`) of a twilio exception.

    Twilio's classic errors (`TwilioRestException`) carry `msg`; its RFC 9457 ones
    (`TwilioServiceException`) carry `title` and `detail`.
    """
    status = int(exc.status)
    code = exc.code
    if isinstance(exc, TwilioServiceException):
        message = f"{exc.title}: {exc.detail}" if exc.detail else str(exc.title)
    else:
        message = str(exc.msg)
    return status, f"twilio {status} error {code}: {message}"


class TwilioSmsProvider:
    """The `sms` channel: one Twilio message per delivery."""

    channel = "sms"

    def __init__(
        self,
        settings: Settings,
        config_for: ConfigFor,
        region_for: RegionFor,
        owner_for: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self._owner_for = owner_for  # a tenant's own account → its id; the global one → "global"
        self._settings = settings
        self._config_for = config_for
        self._region_for = region_for
        self._clients: dict[tuple[str, str], tuple[Any, _Transport]] = {}

    def _client(self, credentials: TwilioCredentials) -> Any:
        key = (credentials.account_sid, credentials.auth_token)
        found = self._clients.get(key)
        if found is None:
            found = _new_client(*key, self._settings.twilio_base_url)
            self._clients[key] = found
        return found[0]

    async def route(self, tenant_id: str) -> Route | None:
        """One breaker per Twilio account (and base URL: the same for all)."""
        credentials = await self._config_for(tenant_id)
        if credentials is None:
            return None
        label = await self._owner_for(tenant_id) if self._owner_for else "global"
        display = "the platform's Twilio account" if label == "global" else "your Twilio account"
        return Route(("twilio", credentials.account_sid), label, display)

    async def send(self, delivery: Delivery) -> Sent:
        credentials = await self._config_for(delivery.tenant_id)
        if credentials is None or not all(
            (credentials.account_sid, credentials.auth_token, credentials.from_number)
        ):
            raise PermanentError(NOT_CONFIGURED)
        region = await self._region_for(delivery.tenant_id)
        try:
            to = to_e164(delivery.recipient, region)
        except InvalidPhone as exc:
            raise PermanentError(f"recipient: {exc}") from None
        try:
            from_ = to_e164(credentials.from_number, region)
        except InvalidPhone as exc:
            raise PermanentError(f"sender (TWILIO_PHONE or tenant from_number): {exc}") from None
        callback: str | None = None
        if self._settings.public_url:
            callback = status_callback_url(
                self._settings.public_url, delivery.tenant_id, delivery.id
            )
        client = self._client(credentials)
        box = _RetryAfter()
        token = _CAPTURE.set(box)
        try:
            async with asyncio.timeout(self._settings.send_timeout):
                message = await client.messages.create_async(
                    to=to,
                    from_=from_,
                    body=delivery.body,
                    status_callback=callback,  # None is left out of the request
                )
        except (TwilioRestException, TwilioServiceException) as exc:
            status, reason = _twilio_reason(exc)
            if status == 429 or status >= 500:
                raise TransientError(reason, retry_after=box.seconds) from None
            if str(exc.code) == TWILIO_OPTED_OUT:
                raise RecipientRefused(reason, "sms_opt_out") from None
            raise PermanentError(reason) from None
        except TimeoutError:
            raise Unreachable(
                f"twilio did not answer within {self._settings.send_timeout:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"twilio unreachable: {type(exc).__name__}: {exc}") from None
        except ValueError:
            # a 2xx whose body is not a message resource: whether it was sent is unknown, and
            # at-least-once prefers a second message to a lost one
            raise TransientError("twilio answered with an unreadable message resource") from None
        finally:
            _CAPTURE.reset(token)
        return Sent(provider_message_id=message.sid, provider_status=message.status)

    async def close(self) -> None:
        """Close every client's aiohttp session; a later send would open new ones."""
        clients, self._clients = list(self._clients.values()), {}
        for _client, http in clients:
            await http.close()
