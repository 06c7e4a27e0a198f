"""The tenant's own delivery settings (SMTP server, Twilio account, defaults), for its admins.

GET never returns a secret: only `password_set` / `auth_token_set`. PUT takes the same shape
plus the write-only `password` / `auth_token`:
- a top-level section left out is kept as stored; `null` removes it (the global setting
  applies again);
- inside `smtp`, leaving `password` out keeps the stored one, so an admin can change the host
  without re-entering it (`""` clears it: a server without AUTH); likewise `auth_token` in
  `twilio`;
- `password_set` / `auth_token_set` are accepted and ignored, so a GET body can be sent back.

Secrets are stored only encrypted (`NOTIFYD_TENANT_SECRET_KEY`); without that key a PUT
carrying one answers 409 rather than store it in plaintext.

With a tenant configuration source (NOTIFYD_TENANT_CONFIG_URL, `notifyd.tenant_config`), the
fields it gives win over the stored ones: GET shows them (`sourced` names them) and a PUT of
one answers 409 `sourced-field` naming it; the fields it omits are the tenant's to set here.

Senders read these settings through a cache with a 30 s TTL, so a change takes up to that long
to reach the SMTP and SMS senders of every instance.

An SMTP host goes through the egress policy (`notifyd.egress`) before it is stored: an IP
literal or a name that resolves to a loopback, private or otherwise special address, or a
public address on a port that is not an SMTP one, is a 422 naming `smtp.host` / `smtp.port`.
A name that does not resolve (yet) is stored: DNS may be set up after the settings, and
every connection checks again anyway, which is the check that counts (a name can resolve
elsewhere by then). The Twilio section holds no address: the API's base URL is the
operator's `TWILIO_API_BASE_URL`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from notifyd import tags
from notifyd.auth import policy
from notifyd.egress import Egress, EgressRefused, ResolveFailed
from notifyd.http.context import Services, audit_entry, identity, services, source_unavailable
from notifyd.http.problems import FieldError, Problem, forbidden, unsendable
from notifyd.http.responses import json_response
from notifyd.http.validation import read_model, schemas
from notifyd.schemas.tenants import TenantSettings
from notifyd.secretbox import SecretBox
from notifyd.store import audit
from notifyd.store import tenants as store
from notifyd.store.tenants import KEEP, Keep, SmtpConfig, TwilioConfig

log = logging.getLogger("notifyd.http.tenants")

SOURCED_MESSAGE = (
    "is set by the tenant configuration source (NOTIFYD_TENANT_CONFIG_URL): change it there"
)


@dataclass(frozen=True)
class _Change:
    """A validated PUT body: each section a new value, None (remove) or KEEP."""

    smtp: SmtpConfig | Literal[Keep.KEEP] | None
    keep_password: bool
    twilio: TwilioConfig | Literal[Keep.KEEP] | None
    keep_auth_token: bool
    default_region: str | Literal[Keep.KEEP] | None
    default_locale: str | Literal[Keep.KEEP] | None
    default_timezone: str | Literal[Keep.KEEP] | None

    @property
    def new_secrets(self) -> bool:
        """Whether this change stores a secret it was given (rather than keeping one)."""
        password = (
            isinstance(self.smtp, SmtpConfig) and not self.keep_password and self.smtp.password
        )
        token = (
            isinstance(self.twilio, TwilioConfig)
            and not self.keep_auth_token
            and self.twilio.auth_token
        )
        return bool(password or token)


def settings_json(
    redacted: store.RedactedSettings, source: store.TenantSettings | None = None
) -> dict[str, Any]:
    """The stored settings with the source's fields over them (`sourced` names those)."""
    tenant = store.overlay(redacted.settings, source)
    given = source.sourced if source is not None else frozenset()
    password_set, auth_token_set = redacted.password_set, redacted.auth_token_set
    if source is not None and "smtp" in given:
        password_set = bool(source.smtp and source.smtp.password)
    if source is not None and "twilio" in given:
        auth_token_set = bool(source.twilio and source.twilio.auth_token)
    smtp = tenant.smtp
    twilio = tenant.twilio
    return {
        "smtp": None
        if smtp is None
        else {
            "host": smtp.host,
            "port": smtp.port,
            "username": smtp.username,
            "use_tls": smtp.use_tls,
            "use_ssl": smtp.use_ssl,
            "from_email": smtp.from_email,
            "password_set": password_set,
        },
        "twilio": None
        if twilio is None
        else {
            "account_sid": twilio.account_sid,
            "from_number": twilio.from_number,
            "auth_token_set": auth_token_set,
        },
        "default_region": tenant.default_region,
        "default_locale": tenant.default_locale,
        "default_timezone": tenant.default_timezone,
        "sourced": sorted(given),
    }


async def _source(ctx: Services, tenant_id: str) -> store.TenantSettings | None:
    try:
        return await ctx.tenant_settings.sourced(tenant_id)
    except store.SourceUnavailable as exc:
        raise source_unavailable(exc) from None


def _refuse_sourced(body: TenantSettings, source: store.TenantSettings | None) -> None:
    """409 for a PUT of a field the tenant configuration source gives (it would not win)."""
    if source is None:
        return
    clash = sorted(source.sourced & body.model_fields_set)
    if clash:
        raise Problem(
            409,
            f"set by the tenant configuration source, read-only here: {', '.join(clash)}",
            kind="sourced-field",
            errors=[FieldError(name, SOURCED_MESSAGE) for name in clash],
        )


def _require_admin(request: web.Request) -> None:
    if not policy.may_manage_tenant_settings(identity(request)):
        raise forbidden("only the tenant's admins may manage its delivery settings")


def _change(body: TenantSettings) -> _Change:
    """The stored settings' change a valid body asks for: absent → KEEP, null → remove."""
    given = body.model_fields_set
    smtp: SmtpConfig | Literal[Keep.KEEP] | None = KEEP
    keep_password = keep_auth_token = False
    if "smtp" in given:
        smtp = None
        if body.smtp is not None:
            asked = body.smtp
            smtp = SmtpConfig(
                host=asked.host,
                port=asked.port,
                username=asked.username or "",
                password=asked.password or "",
                use_tls=bool(asked.use_tls),
                use_ssl=bool(asked.use_ssl),
                from_email=asked.from_email,
            )
            keep_password = asked.password is None
    twilio: TwilioConfig | Literal[Keep.KEEP] | None = KEEP
    if "twilio" in given:
        twilio = None
        if body.twilio is not None:
            account = body.twilio
            twilio = TwilioConfig(
                account_sid=account.account_sid,
                auth_token=account.auth_token or "",
                from_number=account.from_number,
            )
            keep_auth_token = account.auth_token is None
    region = body.default_region if "default_region" in given else KEEP
    locale: str | Literal[Keep.KEEP] | None = KEEP
    if "default_locale" in given:
        # one spelling: pt_br, pt-br → pt-BR
        locale = None if body.default_locale is None else tags.normalize_locale(body.default_locale)
    zone = body.default_timezone if "default_timezone" in given else KEEP
    return _Change(smtp, keep_password, twilio, keep_auth_token, region, locale, zone)


def _audit_details(change: _Change) -> dict[str, Any]:
    """What changed, without any secret."""
    details: dict[str, Any] = {}
    if change.smtp is None:
        details["smtp"] = "removed"
    elif isinstance(change.smtp, SmtpConfig):
        details["smtp"] = {
            "host": change.smtp.host,
            "port": change.smtp.port,
            "from_email": change.smtp.from_email,
            "password": "kept" if change.keep_password else "changed",
        }
    if change.twilio is None:
        details["twilio"] = "removed"
    elif isinstance(change.twilio, TwilioConfig):
        details["twilio"] = {
            "account_sid": change.twilio.account_sid,
            "from_number": change.twilio.from_number,
            "auth_token": "kept" if change.keep_auth_token else "changed",
        }
    if change.default_region is not KEEP:
        details["default_region"] = change.default_region
    if change.default_locale is not KEEP:
        details["default_locale"] = change.default_locale
    if change.default_timezone is not KEEP:
        details["default_timezone"] = change.default_timezone
    return details


async def _check_egress(egress: Egress, smtp: SmtpConfig) -> None:
    """422 for a relay the egress policy refuses; a host that does not resolve is let through
    (see the module's docstring)."""
    try:
        await egress.check(smtp.host, smtp.port)
    except EgressRefused as exc:
        log.info(
            "tenant SMTP relay refused by the egress policy",
            extra={"host": smtp.host, "address": exc.address, "port": smtp.port},
        )
        # the relay's address, not the body's shape: `unsendable`
        raise unsendable([FieldError(f"smtp.{exc.field}", exc.message)]) from None
    except ResolveFailed as exc:
        log.info("tenant SMTP host stored unresolved", extra={"error": str(exc)})


async def get_settings(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    tenant_id = identity(request).tenant_id
    source = await _source(ctx, tenant_id)
    redacted = await store.load_redacted(ctx.pool, tenant_id)
    return json_response(settings_json(redacted, source))


async def put_settings(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    tenant_id = identity(request).tenant_id
    body = await read_model(request, schemas(request).tenant_settings)
    source = await _source(ctx, tenant_id)
    _refuse_sourced(body, source)
    change = _change(body)
    if isinstance(change.smtp, SmtpConfig):
        await _check_egress(ctx.egress, change.smtp)
    box = SecretBox.from_settings(ctx.settings)
    if box is None and change.new_secrets:
        raise Problem(
            409,
            "secrets cannot be stored: the operator must set NOTIFYD_TENANT_SECRET_KEY "
            "(tenant passwords and tokens are only ever stored encrypted)",
            kind="secret-key-missing",
        )
    async with ctx.pool.acquire() as conn, conn.transaction():
        try:
            await store.update(
                conn,
                tenant_id,
                box,
                smtp=change.smtp,
                twilio=change.twilio,
                default_region=change.default_region,
                default_locale=change.default_locale,
                default_timezone=change.default_timezone,
                keep_password=change.keep_password,
                keep_auth_token=change.keep_auth_token,
            )
        except store.NothingToKeep as exc:
            # whether a token is stored is state, not the body's shape: `unsendable`
            raise unsendable(
                [FieldError(exc.field_name, "is required: no token is stored yet")]
            ) from None
        await audit.record(
            conn, audit_entry(request, "tenant.settings_update", _audit_details(change))
        )
        redacted = await store.load_redacted(conn, tenant_id)
    # this instance sees the change at once; others within the cache TTL (30 s)
    ctx.tenant_settings.invalidate(tenant_id)
    return json_response(settings_json(redacted, source))


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/tenants/current/settings/", get_settings)
        app.router.add_put(f"{prefix}/tenants/current/settings/", put_settings)
