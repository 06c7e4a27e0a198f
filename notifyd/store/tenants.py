"""Per-tenant delivery settings: the tenant's own SMTP server, Twilio account and defaults.

Everything lives in the `tenants.settings` jsonb document, one key per section (`smtp`,
`twilio`, `default_region`, `default_locale`); a section that is absent or null means "use the
global setting". Secrets are stored only sealed by a `SecretBox` (`password_enc`,
`auth_token_enc`), never in plaintext: with no box configured, storing one is refused.

Writes merge the sections they change into the document (`settings || $2`), so keys other
modules may add later survive, and they run under a row lock so two admins saving at once
cannot resurrect a password the other just replaced.

Senders read settings through `TenantSettingsCache`: a short TTL keeps the SMTP and SMS hot
paths off PostgreSQL while an admin's change still takes effect within `ttl` seconds on every
instance.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from notifyd.secretbox import SecretBox, SecretError
from notifyd.settings import Settings
from notifyd.store.pool import Conn, Executor

GET = "SELECT settings FROM tenants WHERE tenant_id = $1"

# The row must exist before it can be locked; the lock then serialises concurrent saves.
ENSURE_ROW = "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT (tenant_id) DO NOTHING"

GET_FOR_UPDATE = "SELECT settings FROM tenants WHERE tenant_id = $1 FOR UPDATE"

MERGE = """
UPDATE tenants SET settings = settings || $2::jsonb, updated_at = now()
WHERE tenant_id = $1
"""


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    use_tls: bool  # STARTTLS after connecting
    use_ssl: bool  # implicit TLS from the first byte
    from_email: str
    # the operator's EMAIL_* relay (smtp_for's fallback), which the egress policy does not
    # check; never stored, so a tenant's own settings always have it false
    operator_relay: bool = False


@dataclass(frozen=True)
class TwilioConfig:
    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str


@dataclass(frozen=True)
class SourcedTemplate:
    """A template the tenant configuration source gave (`notifyd.tenant_config`)."""

    subject: str | None
    text_body: str
    html_body: str | None
    locale: str  # normalised; "" is the default


TemplateId = tuple[str, str, str]
"""(template_key, channel, locale) of a sourced template."""


@dataclass(frozen=True)
class TenantSettings:
    """A tenant's own settings, secrets in plaintext; None means the global setting applies.

    `sourced` names the fields (of `smtp`, `twilio`, `default_region`, `default_locale`) the
    tenant configuration source gave, which win over the stored ones (`overlay`); `templates`
    are the source's templates, which win over stored rows of the same locale."""

    smtp: SmtpConfig | None = None
    twilio: TwilioConfig | None = None
    default_region: str | None = None
    default_locale: str | None = None
    default_timezone: str | None = None  # quiet hours of recipients without a zone
    templates: Mapping[TemplateId, SourcedTemplate] = field(default_factory=dict)
    sourced: frozenset[str] = frozenset()


class SourceUnavailable(Exception):
    """The tenant configuration source could not be read for a tenant never read before:
    its sends wait (are retried), they are not made with settings the source may override."""


def overlay(stored: TenantSettings, source: TenantSettings | None) -> TenantSettings:
    """What the source gave wins, field by field; what it left out is the stored value."""
    if source is None:
        return stored
    given = source.sourced
    return TenantSettings(
        smtp=source.smtp if "smtp" in given else stored.smtp,
        twilio=source.twilio if "twilio" in given else stored.twilio,
        default_region=source.default_region
        if "default_region" in given
        else stored.default_region,
        default_locale=source.default_locale
        if "default_locale" in given
        else stored.default_locale,
        default_timezone=stored.default_timezone,
        templates=source.templates,
        sourced=given,
    )


@dataclass(frozen=True)
class RedactedSettings:
    """What an admin may see: the settings with secrets blanked, and whether each is set."""

    settings: TenantSettings
    password_set: bool
    auth_token_set: bool


class Keep(enum.Enum):
    """Marks a section `update` leaves as stored."""

    KEEP = "keep"


KEEP: Literal[Keep.KEEP] = Keep.KEEP


class SecretKeyMissing(SecretError):
    """A secret was to be stored but no `NOTIFYD_TENANT_SECRET_KEY` is configured."""


class NothingToKeep(Exception):
    """`update` was asked to keep a stored secret that does not exist; names the field."""

    def __init__(self, field_name: str) -> None:
        super().__init__(f"{field_name}: no stored value to keep")
        self.field_name = field_name


def _section(document: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    value = document.get(name)
    return value if isinstance(value, Mapping) else None


def _open(section: Mapping[str, Any], name: str, box: SecretBox | None) -> str:
    sealed = section.get(f"{name}_enc")
    if not sealed:
        return ""
    if box is None:
        raise SecretKeyMissing(
            "a tenant secret is stored but NOTIFYD_TENANT_SECRET_KEY is not set; "
            "set it to the key the secret was stored with"
        )
    return box.decrypt(str(sealed))


def _seal(plaintext: str, box: SecretBox | None, what: str) -> str | None:
    if not plaintext:
        return None
    if box is None:
        raise SecretKeyMissing(
            f"cannot store the {what}: NOTIFYD_TENANT_SECRET_KEY is not set, and secrets are "
            "never stored in plaintext"
        )
    return box.encrypt(plaintext)


def decode(document: Mapping[str, Any], box: SecretBox | None) -> TenantSettings:
    """The typed settings of a stored document, secrets opened (SecretError if they cannot be)."""
    smtp = _section(document, "smtp")
    twilio = _section(document, "twilio")
    return TenantSettings(
        smtp=None
        if smtp is None
        else SmtpConfig(
            host=str(smtp["host"]),
            port=int(smtp["port"]),
            username=str(smtp.get("username") or ""),
            password=_open(smtp, "password", box),
            use_tls=bool(smtp.get("use_tls")),
            use_ssl=bool(smtp.get("use_ssl")),
            from_email=str(smtp["from_email"]),
        ),
        twilio=None
        if twilio is None
        else TwilioConfig(
            account_sid=str(twilio["account_sid"]),
            auth_token=_open(twilio, "auth_token", box),
            from_number=str(twilio["from_number"]),
        ),
        default_region=document.get("default_region") or None,
        default_locale=document.get("default_locale") or None,
        default_timezone=document.get("default_timezone") or None,
    )


def redact(document: Mapping[str, Any]) -> RedactedSettings:
    """The stored settings without opening any secret (works with no key configured)."""
    shown = decode(
        {
            **document,
            "smtp": _without_secret(_section(document, "smtp"), "password"),
            "twilio": _without_secret(_section(document, "twilio"), "auth_token"),
        },
        None,
    )
    smtp = _section(document, "smtp")
    twilio = _section(document, "twilio")
    return RedactedSettings(
        settings=shown,
        password_set=bool(smtp and smtp.get("password_enc")),
        auth_token_set=bool(twilio and twilio.get("auth_token_enc")),
    )


def _without_secret(section: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    if section is None:
        return None
    return {key: value for key, value in section.items() if key != f"{name}_enc"}


def _smtp_document(
    smtp: SmtpConfig, box: SecretBox | None, kept: Mapping[str, Any] | None
) -> dict[str, Any]:
    password_enc = kept.get("password_enc") if kept is not None else None
    if kept is None:
        password_enc = _seal(smtp.password, box, "SMTP password")
    return {
        "host": smtp.host,
        "port": smtp.port,
        "username": smtp.username,
        "password_enc": password_enc,
        "use_tls": smtp.use_tls,
        "use_ssl": smtp.use_ssl,
        "from_email": smtp.from_email,
    }


def _twilio_document(
    twilio: TwilioConfig, box: SecretBox | None, kept: Mapping[str, Any] | None
) -> dict[str, Any]:
    token_enc = kept.get("auth_token_enc") if kept is not None else None
    if kept is None:
        token_enc = _seal(twilio.auth_token, box, "Twilio auth token")
    return {
        "account_sid": twilio.account_sid,
        "auth_token_enc": token_enc,
        "from_number": twilio.from_number,
    }


async def load_document(executor: Executor, tenant_id: str) -> dict[str, Any]:
    """The stored document as is (secrets sealed); empty for a tenant never configured."""
    document = await executor.fetchval(GET, tenant_id)
    return dict(document) if isinstance(document, Mapping) else {}


async def load(executor: Executor, tenant_id: str, box: SecretBox | None) -> TenantSettings:
    """The tenant's settings with secrets opened; empty settings for an unknown tenant."""
    return decode(await load_document(executor, tenant_id), box)


async def load_redacted(executor: Executor, tenant_id: str) -> RedactedSettings:
    return redact(await load_document(executor, tenant_id))


async def update(
    conn: Conn,
    tenant_id: str,
    box: SecretBox | None,
    *,
    smtp: SmtpConfig | Literal[Keep.KEEP] | None = KEEP,
    twilio: TwilioConfig | Literal[Keep.KEEP] | None = KEEP,
    default_region: str | Literal[Keep.KEEP] | None = KEEP,
    default_locale: str | Literal[Keep.KEEP] | None = KEEP,
    default_timezone: str | Literal[Keep.KEEP] | None = KEEP,
    keep_password: bool = False,
    keep_auth_token: bool = False,
) -> None:
    """Change the given sections (None removes one); call inside a transaction.

    `keep_password` / `keep_auth_token` keep the stored sealed secret instead of the one in
    `smtp` / `twilio`, so an admin can change the host without re-entering the password; the
    ciphertext is carried over untouched, so this works even after the key list changed.
    Raises `SecretKeyMissing` for a new secret with no box, `NothingToKeep` when a Twilio
    token is to be kept but none is stored (a Twilio account is useless without one).
    """
    await conn.execute(ENSURE_ROW, tenant_id)
    stored = await conn.fetchval(GET_FOR_UPDATE, tenant_id)
    current: Mapping[str, Any] = stored if isinstance(stored, Mapping) else {}
    change: dict[str, Any] = {}
    if smtp is not KEEP:
        kept = (_section(current, "smtp") or {}) if keep_password else None
        change["smtp"] = None if smtp is None else _smtp_document(smtp, box, kept)
    if twilio is not KEEP:
        kept = _section(current, "twilio") if keep_auth_token else None
        if twilio is not None and keep_auth_token and not (kept and kept.get("auth_token_enc")):
            raise NothingToKeep("twilio.auth_token")
        change["twilio"] = None if twilio is None else _twilio_document(twilio, box, kept)
    if default_region is not KEEP:
        change["default_region"] = default_region
    if default_locale is not KEEP:
        change["default_locale"] = default_locale
    if default_timezone is not KEEP:
        change["default_timezone"] = default_timezone
    await conn.execute(MERGE, tenant_id, change)


async def save(conn: Conn, tenant_id: str, settings: TenantSettings, box: SecretBox | None) -> None:
    """Replace every section with `settings`, sealing its secrets (an upsert)."""
    await update(
        conn,
        tenant_id,
        box,
        smtp=settings.smtp,
        twilio=settings.twilio,
        default_region=settings.default_region,
        default_locale=settings.default_locale,
        default_timezone=settings.default_timezone,
    )


def smtp_for(tenant: TenantSettings, settings: Settings) -> SmtpConfig:
    """The tenant's SMTP server, else the global `EMAIL_*` one (marked `operator_relay`)."""
    if tenant.smtp is not None:
        return tenant.smtp
    return SmtpConfig(
        host=settings.email_host,
        port=settings.email_port,
        username=settings.email_host_user,
        password=settings.email_host_password,
        use_tls=settings.email_use_tls,
        use_ssl=settings.email_use_ssl,
        from_email=settings.email_from,
        operator_relay=True,
    )


def twilio_for(tenant: TenantSettings, settings: Settings) -> TwilioConfig | None:
    """The tenant's Twilio account, else the global `TWILIO_*` one, else None (no SMS)."""
    if tenant.twilio is not None:
        return tenant.twilio
    if settings.twilio_account_sid and settings.twilio_auth_token:
        return TwilioConfig(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_number=settings.twilio_phone,
        )
    return None


def region_for(tenant: TenantSettings, settings: Settings) -> str:
    """The region national phone numbers are read in (`7568992589` → +1…)."""
    return tenant.default_region or settings.default_region


def locale_for(tenant: TenantSettings, settings: Settings) -> str:
    return tenant.default_locale or settings.default_locale


@dataclass
class _Entry:
    expires: float
    settings: TenantSettings


class TenantSettingsCache:
    """Per-tenant settings kept `ttl` seconds, with one load in flight per tenant.

    A burst of sends for one tenant costs one query, not one per message. A failed load (the
    database down, a secret that cannot be opened) is not cached: every waiter of that load
    sees the error and the next `get` tries again. `invalidate` drops the tenant's entry and
    makes a load already running not cache its (possibly stale) result.
    """

    def __init__(
        self,
        pool: Executor,
        box: SecretBox | None,
        ttl: float = 30.0,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        source: Callable[[str], Awaitable[TenantSettings | None]] | None = None,
    ) -> None:
        """`source`: the tenant configuration source's settings of a tenant (None: it gives
        nothing), laid over the stored ones by `get` (`overlay`); it keeps its own cache and
        raises `SourceUnavailable` when it has nothing yet for the tenant."""
        self._source = source
        self._pool = pool
        self._box = box
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Task[TenantSettings]] = {}
        self._generation: dict[str, int] = {}

    async def get(self, tenant_id: str) -> TenantSettings:
        """The tenant's settings: the source's fields over the stored ones."""
        stored = await self.stored(tenant_id)
        if self._source is None:
            return stored
        return overlay(stored, await self._source(tenant_id))

    async def sourced(self, tenant_id: str) -> TenantSettings | None:
        """What the source gives for the tenant (None: no source, or nothing given)."""
        return None if self._source is None else await self._source(tenant_id)

    async def public(self, tenant_id: str) -> TenantSettings:
        """What rendering and the request path need (region, locale, the source's templates),
        without opening a stored secret: a key problem does not stop them (the senders raise
        that alarm)."""
        stored = (await load_redacted(self._pool, tenant_id)).settings
        return overlay(stored, await self.sourced(tenant_id))

    async def stored(self, tenant_id: str) -> TenantSettings:
        """The tenant's settings as notifyd stores them."""
        entry = self._entries.get(tenant_id)
        if entry is not None and self._clock() < entry.expires:
            return entry.settings
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._load(tenant_id), name=f"tenant-settings:{tenant_id}")
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._forget(tenant_id, done))
        # shield: one waiter being cancelled must not cancel the load the others wait on
        return await asyncio.shield(task)

    def invalidate(self, tenant_id: str) -> None:
        self._entries.pop(tenant_id, None)
        self._loading.pop(tenant_id, None)
        self._generation[tenant_id] = self._generation.get(tenant_id, 0) + 1

    async def _load(self, tenant_id: str) -> TenantSettings:
        generation = self._generation.get(tenant_id, 0)
        settings = await load(self._pool, tenant_id, self._box)
        if self._generation.get(tenant_id, 0) == generation:
            self._store(tenant_id, settings)
        return settings

    def _store(self, tenant_id: str, settings: TenantSettings) -> None:
        now = self._clock()
        if len(self._entries) >= self._max_entries and tenant_id not in self._entries:
            for key in [k for k, e in self._entries.items() if e.expires <= now]:
                del self._entries[key]
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]  # the oldest insertion
        self._entries[tenant_id] = _Entry(now + self._ttl, settings)

    def _forget(self, tenant_id: str, done: asyncio.Task[TenantSettings]) -> None:
        if self._loading.get(tenant_id) is done:
            del self._loading[tenant_id]
        if not done.cancelled():
            done.exception()  # retrieved here so a load nobody awaited logs no warning
