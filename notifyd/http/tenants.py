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
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from notifyd import tags
from notifyd.auth import policy
from notifyd.egress import Egress, EgressRefused, ResolveFailed
from notifyd.http.context import audit_entry, identity, services
from notifyd.http.problems import Problem, forbidden
from notifyd.http.responses import json_response
from notifyd.http.validation import Fields, is_email, read_json_object
from notifyd.ids import OpaqueIdRule
from notifyd.secretbox import SecretBox
from notifyd.store import audit
from notifyd.store import tenants as store
from notifyd.store.tenants import KEEP, Keep, SmtpConfig, TwilioConfig

log = logging.getLogger("notifyd.http.tenants")

_HOST = re.compile(r"[A-Za-z0-9\[][A-Za-z0-9.:_\[\]-]{0,252}")
_ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
# Loose on purpose: the SMS provider normalises to E.164 with the tenant's default region.
_PHONE = re.compile(r"\+?[0-9(][0-9 ().-]{4,30}")
_REGION = re.compile(r"[A-Z]{2}")

SMTP_FIELDS = frozenset(
    {"host", "port", "username", "password", "password_set", "use_tls", "use_ssl", "from_email"}
)
TWILIO_FIELDS = frozenset({"account_sid", "auth_token", "auth_token_set", "from_number"})
TOP_FIELDS = frozenset({"smtp", "twilio", "default_region", "default_locale"})


@dataclass(frozen=True)
class _Change:
    """A validated PUT body: each section a new value, None (remove) or KEEP."""

    smtp: SmtpConfig | Literal[Keep.KEEP] | None
    keep_password: bool
    twilio: TwilioConfig | Literal[Keep.KEEP] | None
    keep_auth_token: bool
    default_region: str | Literal[Keep.KEEP] | None
    default_locale: str | Literal[Keep.KEEP] | None

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


def settings_json(redacted: store.RedactedSettings) -> dict[str, Any]:
    tenant = redacted.settings
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
            "password_set": redacted.password_set,
        },
        "twilio": None
        if twilio is None
        else {
            "account_sid": twilio.account_sid,
            "from_number": twilio.from_number,
            "auth_token_set": redacted.auth_token_set,
        },
        "default_region": tenant.default_region,
        "default_locale": tenant.default_locale,
    }


def _require_admin(request: web.Request) -> None:
    if not policy.may_manage_tenant_settings(identity(request)):
        raise forbidden("only the tenant's admins may manage its delivery settings")


def _unknown(fields: Fields, data: Mapping[str, Any], known: frozenset[str]) -> None:
    for name in data:
        if name not in known:
            fields.error(name, "is not a known field")


def _single_line(fields: Fields, name: str, value: str | None) -> str | None:
    """`value`, unless it holds a character no mail header or SMTP command may carry."""
    problem = None if value is None else tags.header_problem(value)
    if problem is not None:
        fields.error(name, problem)
        return None
    return value


def _port(fields: Fields, data: Mapping[str, Any]) -> int | None:
    value = data.get("port")
    if value is None:
        fields.error("port", "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        fields.error("port", "must be an integer from 1 to 65535")
        return None
    return value


def _nested(outer: Fields, prefix: str, inner: Fields) -> None:
    """Move a section's errors to the outer body, named `section.field`."""
    for error in inner.errors:
        outer.error(f"{prefix}.{error.field}", error.message)


def _parse_smtp(
    outer: Fields, data: Mapping[str, Any], id_rule: OpaqueIdRule
) -> tuple[SmtpConfig | None, bool]:
    """(config, keep the stored password); config None when invalid (errors recorded)."""
    fields = Fields(data, id_rule, strict=False)
    _unknown(fields, data, SMTP_FIELDS)
    host = _single_line(fields, "host", fields.string("host", max_length=253))
    if host is not None and not _HOST.fullmatch(host):
        fields.error("host", "must be a host name or IP address")
    port = _port(fields, data)
    username = fields.string("username", required=False, max_length=256, allow_empty=True)
    username = _single_line(fields, "username", username)
    password = fields.string("password", required=False, max_length=1024, allow_empty=True)
    password = _single_line(fields, "password", password)
    use_tls = fields.boolean("use_tls") or False
    use_ssl = fields.boolean("use_ssl") or False
    fields.boolean("password_set")  # read-only: accepted so a GET body can be sent back
    from_email = _single_line(fields, "from_email", fields.string("from_email", max_length=254))
    if from_email is not None and not is_email(from_email):
        fields.error("from_email", "must be an email address")
    if use_tls and use_ssl:
        fields.error("use_ssl", "use_tls (STARTTLS) and use_ssl (implicit TLS) exclude each other")
    _nested(outer, "smtp", fields)
    if fields.errors:
        return None, False
    assert host is not None and port is not None and from_email is not None
    config = SmtpConfig(
        host=host,
        port=port,
        username=username or "",
        password=password or "",
        use_tls=use_tls,
        use_ssl=use_ssl,
        from_email=from_email,
    )
    return config, "password" not in data or data["password"] is None


def _parse_twilio(
    outer: Fields, data: Mapping[str, Any], id_rule: OpaqueIdRule
) -> tuple[TwilioConfig | None, bool]:
    """(config, keep the stored token); config None when invalid (errors recorded)."""
    fields = Fields(data, id_rule, strict=False)
    _unknown(fields, data, TWILIO_FIELDS)
    sid = fields.string("account_sid", max_length=34)
    if sid is not None and not _ACCOUNT_SID.fullmatch(sid):
        fields.error("account_sid", "must be AC followed by 32 hexadecimal digits")
    token = fields.string("auth_token", required=False, max_length=256)
    token = _single_line(fields, "auth_token", token)
    fields.boolean("auth_token_set")  # read-only, ignored
    number = fields.string("from_number", max_length=40)
    if number is not None and (
        not _PHONE.fullmatch(number) or sum(c.isdigit() for c in number) < 5
    ):
        fields.error("from_number", "must be a phone number, e.g. +14155550100 or 4155550100")
    _nested(outer, "twilio", fields)
    if fields.errors:
        return None, False
    assert sid is not None and number is not None
    return TwilioConfig(account_sid=sid, auth_token=token or "", from_number=number), token is None


def _section(
    fields: Fields, body: Mapping[str, Any], name: str
) -> Mapping[str, Any] | Literal[Keep.KEEP] | None:
    if name not in body:
        return KEEP
    value = body[name]
    if value is None or isinstance(value, Mapping):
        return value
    fields.error(name, "must be a JSON object, or null to use the global setting")
    return KEEP


def _parse(body: Mapping[str, Any], id_rule: OpaqueIdRule) -> _Change:
    fields = Fields(body, id_rule, strict=False)
    _unknown(fields, body, TOP_FIELDS)
    smtp: SmtpConfig | Literal[Keep.KEEP] | None = KEEP
    twilio: TwilioConfig | Literal[Keep.KEEP] | None = KEEP
    keep_password = keep_auth_token = False
    smtp_body = _section(fields, body, "smtp")
    if smtp_body is None or smtp_body is KEEP:
        smtp = smtp_body
    else:
        smtp, keep_password = _parse_smtp(fields, smtp_body, id_rule)
    twilio_body = _section(fields, body, "twilio")
    if twilio_body is None or twilio_body is KEEP:
        twilio = twilio_body
    else:
        twilio, keep_auth_token = _parse_twilio(fields, twilio_body, id_rule)
    region: str | Literal[Keep.KEEP] | None = KEEP
    if "default_region" in body:
        region = fields.string("default_region", required=False, max_length=2)
        if region is not None and not _REGION.fullmatch(region):
            fields.error("default_region", "must be a two-letter country code such as US or GB")
    locale: str | Literal[Keep.KEEP] | None = KEEP
    if "default_locale" in body:
        locale = fields.string("default_locale", required=False, max_length=tags.LOCALE_MAX_LENGTH)
        if locale is not None and not tags.is_locale(locale):
            fields.error("default_locale", "must be a language code such as en or pt-BR")
        elif locale is not None:
            locale = tags.normalize_locale(locale)  # one spelling: pt_br, pt-br → pt-BR
    fields.done()
    return _Change(smtp, keep_password, twilio, keep_auth_token, region, locale)


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
    return details


async def _check_egress(egress: Egress, smtp: SmtpConfig, id_rule: OpaqueIdRule) -> None:
    """422 for a relay the egress policy refuses; a host that does not resolve is let through
    (see the module's docstring)."""
    try:
        await egress.check(smtp.host, smtp.port)
    except EgressRefused as exc:
        log.info(
            "tenant SMTP relay refused by the egress policy",
            extra={"host": smtp.host, "address": exc.address, "port": smtp.port},
        )
        fields = Fields({}, id_rule)
        fields.error(f"smtp.{exc.field}", exc.message)
        fields.done()
    except ResolveFailed as exc:
        log.info("tenant SMTP host stored unresolved", extra={"error": str(exc)})


async def get_settings(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    redacted = await store.load_redacted(ctx.pool, identity(request).tenant_id)
    return json_response(settings_json(redacted))


async def put_settings(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    tenant_id = identity(request).tenant_id
    change = _parse(await read_json_object(request), ctx.id_rule)
    if isinstance(change.smtp, SmtpConfig):
        await _check_egress(ctx.egress, change.smtp, ctx.id_rule)
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
                keep_password=change.keep_password,
                keep_auth_token=change.keep_auth_token,
            )
        except store.NothingToKeep as exc:
            fields = Fields({}, ctx.id_rule)
            fields.error(exc.field_name, "is required: no token is stored yet")
            fields.done()
        await audit.record(
            conn, audit_entry(request, "tenant.settings_update", _audit_details(change))
        )
        redacted = await store.load_redacted(conn, tenant_id)
    # this instance sees the change at once; others within the cache TTL (30 s)
    ctx.tenant_settings.invalidate(tenant_id)
    return json_response(settings_json(redacted))


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/tenants/current/settings/", get_settings)
        app.router.add_put(f"{prefix}/tenants/current/settings/", put_settings)
