"""Provider callbacks: Twilio's message status reports (`POST /webhooks/twilio/status`).

No bearer token: Twilio cannot send one. What authenticates the request instead is
`X-Twilio-Signature`, an HMAC of the URL Twilio called plus the form fields, keyed with the
account's auth token. The URL must be the one Twilio was given: behind a proxy that is
`NOTIFYD_PUBLIC_URL` + path + query (exactly as the SMS provider built the StatusCallback),
otherwise the URL of this request. Nothing is read or changed before the signature checks out.

The tenant and notification ids travel in the callback URL's query, so they are covered by
the signature too. The query and the form are read by their models (`schemas.webhooks`, which
/openapi.json publishes); a fault in either answers 400. Callbacks may arrive out of order,
twice, or before the sender recorded the send: `store.deliveries.record_provider_status`
applies only a later stage and lets the row's status follow only once it is `sent`. Twilio
is answered 204 for every authentic callback, applied or not (stale, unknown row, another
tenant's id): a non-2xx would only make it retry.

A callback saying the number opted out (`ErrorCode` 21610, or `OptOutType=STOP` as Twilio's
Advanced Opt-Out reports a STOP) puts the notification's recipient, as stored, on the tenant's
suppression list in the same transaction (`notifyd.suppressions`).

Signatures are checked with the auth token of the account that sent the message: the
tenant's own Twilio account when its admin configured one, else the global one.
"""

from __future__ import annotations

import contextlib
import logging

from aiohttp import web
from redis.exceptions import RedisError
from twilio.request_validator import RequestValidator

from notifyd.http.context import services
from notifyd.http.problems import Problem, forbidden
from notifyd.http.validation import schemas
from notifyd.logs import tenant_id_var
from notifyd.providers.sms import STATUS_CALLBACK_PATH
from notifyd.schemas.errors import Invalid
from notifyd.schemas.twilio import FIELD_MAX_LENGTH
from notifyd.secretbox import SecretError
from notifyd.store import deliveries
from notifyd.store import suppressions as suppression_store
from notifyd.store.tenants import twilio_for
from notifyd.suppressions import TWILIO_OPTED_OUT

log = logging.getLogger("notifyd.http.webhooks")

FORM = "application/x-www-form-urlencoded"
SIGNATURE_HEADER = "X-Twilio-Signature"


async def _auth_token(request: web.Request, tenant_id: str) -> str:
    """The auth token Twilio signed this tenant's callbacks with (its account's, or global)."""
    ctx = services(request)
    try:
        tenant = await ctx.tenant_settings.get(tenant_id)
    except SecretError:
        return ""  # unreadable secrets: no token, so the callback is refused (403)
    config = twilio_for(tenant, ctx.settings)
    return config.auth_token if config is not None else ""


def _called_url(request: web.Request) -> str:
    """The URL as Twilio called it: raw path and query, never a re-encoded one."""
    public_url = services(request).settings.public_url
    if public_url:
        return public_url.rstrip("/") + request.raw_path
    return f"{request.scheme}://{request.host}{request.raw_path}"


def _error_text(code: str | None, message: str | None, status: str) -> str:
    if code and message:
        return f"twilio {code}: {message}"
    if code:
        return f"twilio {code}: message {status}"
    return f"twilio: message {status}" + (f": {message}" if message else "")


async def twilio_status(request: web.Request) -> web.Response:
    ctx = services(request)
    readers = schemas(request)
    try:
        query = readers.twilio_status_query.python({k: request.query[k] for k in request.query})
    except Invalid as exc:
        detail = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        raise Problem(
            400, f"bad callback URL: {detail}", kind="validation", errors=exc.errors
        ) from None
    tenant_id, notification_id = query.tenant, query.notification
    if request.content_type != FORM:
        raise Problem(415, f"send the callback as {FORM}", kind="unsupported-media-type")

    token = await _auth_token(request, tenant_id)
    signature = request.headers.get(SIGNATURE_HEADER, "")
    form = await request.post()  # url-encoded: every value is a str
    params = {key: value for key, value in form.items() if isinstance(value, str)}
    if not token:
        log.warning("twilio callback refused: no auth token configured to check its signature")
        raise forbidden("the signature cannot be checked: no Twilio auth token is configured")
    # the form itself, not `params`: a repeated field is signed with every value
    if not signature or not RequestValidator(token).validate(_called_url(request), form, signature):
        raise forbidden(f"missing or invalid {SIGNATURE_HEADER}")
    tenant_id_var.set(tenant_id)  # authentic: log lines from here on name the tenant

    try:
        callback = readers.twilio_status.python(params)
    except Invalid as exc:
        raise Problem(
            400, "not a message status callback", kind="validation", errors=exc.errors
        ) from None
    message_sid, status = callback.MessageSid, callback.MessageStatus

    new_status: str | None = None
    error: str | None = None
    if status == "delivered":
        new_status = "delivered"
    elif status in ("undelivered", "failed"):
        new_status = "undelivered"
        error = _error_text(
            (callback.ErrorCode or "")[:FIELD_MAX_LENGTH] or None,
            (callback.ErrorMessage or "")[:FIELD_MAX_LENGTH] or None,
            status,
        )
    error_code = (callback.ErrorCode or "")[:FIELD_MAX_LENGTH]
    opted_out = error_code == TWILIO_OPTED_OUT or (callback.OptOutType or "").upper() == "STOP"
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await deliveries.record_provider_status(
            conn,
            tenant_id,
            notification_id,
            "sms",
            provider_message_id=message_sid,
            provider_status=status,
            new_status=new_status,
            error=error,
        )
        if opted_out:
            # the number replied STOP: this row's recipient (never a number the form names)
            # goes on the tenant's list, even when the callback is stale for the row's status
            await suppression_store.add_for_notification(
                conn,
                tenant_id,
                notification_id,
                "sms",
                "sms_opt_out",
                error or f"twilio: recipient opted out ({status})",
            )
    if row is not None and row["user_id"] is not None:
        # the user's open sockets see "delivered" (or "undelivered") as the carrier says it
        with contextlib.suppress(RedisError):
            await ctx.history.signal_user(
                tenant_id,
                row["user_id"],
                {
                    "type": "delivery",
                    "notification_id": str(notification_id),
                    "channel": "sms",
                    "status": row["status"],
                    "provider_status": status,
                },
            )
    log.info(
        "twilio status callback",
        extra={
            "notification_id": str(notification_id),
            "provider_status": status,
            "applied": row is not None,
        },
    )
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post(STATUS_CALLBACK_PATH, twilio_status)
