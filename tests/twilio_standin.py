"""A local HTTP server speaking Twilio's Messages API, for tests and local development.

It implements what notifyd uses of `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`
the way Twilio answers it: HTTP basic auth with the account SID and auth token (401 with
Twilio's error JSON otherwise), form fields `To`, `From`, `Body`, `StatusCallback`, and a
`201` message resource (`sid` "SM" + 32 hex, `status` "queued", RFC 2822 dates). Every accepted
message is recorded in `messages`. `fail_next()` scripts the next requests to fail (429 with
`Retry-After`, 500, 400 with error 21211, ...), and `send_status()` posts a status callback to
a message's `StatusCallback`, signed with `X-Twilio-Signature` as Twilio signs it.

In a test:

    async with TwilioStandin(accounts={"AC…": "token"}) as twilio:
        settings = ...(TWILIO_API_BASE_URL=twilio.base_url)

For local development: `python -m tests.twilio_standin --port 8081 --sid AC… --token …` and
`TWILIO_API_BASE_URL=http://127.0.0.1:8081`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

API_VERSION = "2010-04-01"
_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_ERRORS = {
    401: (20003, "Authenticate"),
    404: (20404, "The requested resource was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    503: (20503, "Service Unavailable"),
}


@dataclass(frozen=True, slots=True)
class Failure:
    """One scripted error answer."""

    status: int
    code: int | None = None
    message: str | None = None
    retry_after: str | None = None


@dataclass(slots=True)
class Message:
    """A message the stand-in accepted, as Twilio would keep it."""

    sid: str
    account_sid: str
    to: str
    from_: str
    body: str
    status_callback: str | None
    date_created: datetime
    form: dict[str, str] = field(default_factory=dict)

    def resource(self) -> dict[str, Any]:
        created = format_datetime(self.date_created, usegmt=True)
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{self.sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": created,
            "date_sent": None,
            "date_updated": created,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": self.from_,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": self.sid,
            "status": "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": self.to,
            "uri": f"{uri}.json",
        }


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    """Twilio's classic error shape (what `TwilioRestException` is built from)."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _basic_credentials(header: str) -> tuple[str, str]:
    """(login, password) of a Basic Authorization header; empty strings when unreadable."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return "", ""
    login, _, password = decoded.partition(":")
    return login, password


def sign(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """`X-Twilio-Signature` for a POST of `params` to `url`, as Twilio computes it."""
    signature: str = RequestValidator(auth_token).compute_signature(url, dict(params))
    return signature


async def post_signed(
    session: aiohttp.ClientSession,
    url: str,
    params: Mapping[str, str],
    auth_token: str,
    *,
    signed_url: str | None = None,
    signature: str | None = None,
) -> int:
    """POST a webhook as Twilio does; `signed_url` when Twilio knows the host by another name
    (a proxy in front of notifyd), `signature` to send a forged one. Returns the status."""
    headers = {
        "X-Twilio-Signature": signature
        if signature is not None
        else sign(auth_token, signed_url or url, params),
        "User-Agent": "TwilioProxy/1.1",
    }
    async with session.post(url, data=dict(params), headers=headers) as response:
        await response.read()
        return response.status


class TwilioStandin:
    """The Messages API on 127.0.0.1 and a free port, for `accounts` (SID → auth token)."""

    def __init__(self, accounts: Mapping[str, str], *, host: str = "127.0.0.1", port: int = 0):
        self.accounts = dict(accounts)
        self.messages: list[Message] = []
        self.requests = 0
        # seconds every message request waits before answering (a slow or hung Twilio)
        self.stall = 0.0
        self._failures: list[Failure] = []
        self._released = asyncio.Event()
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def fail_next(
        self,
        count: int = 1,
        *,
        status: int,
        code: int | None = None,
        message: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next `count` message requests with this error instead of accepting."""
        self._failures.extend([Failure(status, code, message, retry_after)] * count)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(f"/{API_VERSION}/Accounts/{{sid}}/Messages.json", self._create)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._session = aiohttp.ClientSession()

    async def stop(self) -> None:
        self._released.set()  # stalled requests answer now, so the server stops at once
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TwilioStandin:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _error(
        self, status: int, code: int | None = None, message: str | None = None
    ) -> web.Response:
        default_code, default_message = _ERRORS.get(status, (status, "Error"))
        return web.json_response(
            error_body(status, code or default_code, message or default_message), status=status
        )

    async def _create(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.stall:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), self.stall)
        sid = request.match_info["sid"]
        login, password = _basic_credentials(request.headers.get("Authorization", ""))
        expected = self.accounts.get(sid)
        if login != sid or expected is None or not secrets.compare_digest(password, expected):
            return self._error(401)
        if self._failures:
            failure = self._failures.pop(0)
            response = self._error(failure.status, failure.code, failure.message)
            if failure.retry_after is not None:
                response.headers["Retry-After"] = failure.retry_after
            return response
        form = {key: str(value) for key, value in (await request.post()).items()}
        to, from_, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to:
            return self._error(400, 21604, "A 'To' phone number is required.")
        if not _E164.fullmatch(to):
            return self._error(400, 21211, f"Invalid 'To' Phone Number: {to}")
        if not from_:
            return self._error(400, 21603, "A 'From' phone number is required.")
        if not _E164.fullmatch(from_):
            return self._error(400, 21212, f"Invalid From Number (caller ID): {from_}")
        if not body:
            return self._error(400, 21602, "Message body is required.")
        message = Message(
            sid="SM" + secrets.token_hex(16),
            account_sid=sid,
            to=to,
            from_=from_,
            body=body,
            status_callback=form.get("StatusCallback"),
            date_created=datetime.now(UTC),
            form=form,
        )
        self.messages.append(message)
        return web.json_response(message.resource(), status=201)

    def callback_params(
        self,
        message: Message,
        status: str,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> dict[str, str]:
        """The form Twilio posts to a StatusCallback."""
        params = {
            "AccountSid": message.account_sid,
            "ApiVersion": API_VERSION,
            "From": message.from_,
            "MessageSid": message.sid,
            "MessageStatus": status,
            "SmsSid": message.sid,
            "SmsStatus": status,
            "To": message.to,
        }
        if error_code is not None:
            params["ErrorCode"] = error_code
        if error_message is not None:
            params["ErrorMessage"] = error_message
        return params

    async def send_status(
        self,
        message: Message,
        status: str,
        *,
        error_code: str | None = None,
        error_message: str | None = None,
        url: str | None = None,
        signature: str | None = None,
    ) -> int:
        """Post a status callback for `message` to its StatusCallback (signed for that URL)
        or to `url` (a local address of the same route); returns the HTTP status."""
        assert self._session is not None, "start the stand-in first"
        callback = message.status_callback
        if callback is None:
            raise ValueError("the message was sent without a StatusCallback")
        params = self.callback_params(
            message, status, error_code=error_code, error_message=error_message
        )
        return await post_signed(
            self._session,
            url or callback,
            params,
            self.accounts[message.account_sid],
            signed_url=callback,
            signature=signature,
        )


async def _serve(port: int, sid: str, token: str) -> None:
    async with TwilioStandin({sid: token}, port=port) as standin:
        print(f"Twilio stand-in on {standin.base_url} (account {sid})", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A local stand-in for Twilio's Messages API")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--sid", default="AC" + "0" * 32)
    parser.add_argument("--token", default="standin-token")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.sid, args.token))


if __name__ == "__main__":
    main()
