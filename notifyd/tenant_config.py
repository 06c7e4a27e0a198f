"""Tenants' SMTP relay, Twilio account, defaults and templates from the team's auth service.

`Source` fetches one tenant's document: `NOTIFYD_TENANT_CONFIG_URL` with `{tenant_id}`
(percent-encoded), bearer `NOTIFYD_TENANT_CONFIG_TOKEN`, a connect and a total deadline, at
most NOTIFYD_TENANT_CONFIG_MAX_BYTES, `If-None-Match` with the ETag it has (304: unchanged).
The document is validated whole by the models the API validates the same values with
(`schemas.tenant_config`); templates must compile; the SMTP host, a tenant's value, passes the
egress policy as a PUT of tenant settings does. Anything wrong refuses the whole document
(`Refused`): a log line with the reason and a metric, and nothing changes. 404 means the source
has nothing for this tenant: every value is then notifyd's stored one.

`TenantConfigs` caches each tenant's document for NOTIFYD_TENANT_CONFIG_TTL in this process's
memory only (secrets in clear are never written anywhere), one fetch in flight per tenant,
refreshed in the background once `REFRESH_AT` of the TTL has passed (by the next read, or by
`refresh_due`, which the daemon runs periodically for copies in use). What instances share is
the version: the ETag an instance last validated at the source, in Redis with the rest of the
TTL as its expiry. An instance whose copy has that ETag extends its copy to the key's expiry
without asking the source; otherwise it revalidates with `If-None-Match`. So the source sees
about one request per tenant per TTL however many instances run, and every copy is at most one
TTL older than a validation at the source (docs/architecture.md, "Tenant configuration").

A read of a copy past its TTL that starts the refresh itself waits for it at most
`stale_wait` (1 s); other reads meanwhile, and every read once a wait ran out, take the copy
at once. When the source is slower, or the refresh fails, the last good copy is used
(`notifyd_tenant_config_stale_total`, a log line) and a failed fetch is retried after
`RETRY_AFTER`, doubling for each failure in a row up to `RETRY_MAX`; a tenant never fetched
raises `SourceUnavailable`, which the senders turn into a retry with that reason as
`last_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd import tags
from notifyd.auth.tokens import mint_token
from notifyd.egress import Egress, EgressRefused, ResolveFailed
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.providers import render
from notifyd.providers.render import TemplateSource
from notifyd.providers.render_bounds import RenderLimits
from notifyd.schemas.errors import Invalid, NotAnObject
from notifyd.schemas.fields import PATTERN_MESSAGES
from notifyd.schemas.reader import Reader
from notifyd.schemas.templates import PATTERN_MESSAGES as TEMPLATE_PATTERNS
from notifyd.schemas.tenant_config import (
    SOURCED_FIELDS,
    TenantConfigDocument,
    document_model,
    document_problems,
)
from notifyd.schemas.tenants import PATTERN_MESSAGES as TENANT_PATTERNS
from notifyd.settings import Settings
from notifyd.store.tenants import (
    SmtpConfig,
    SourcedTemplate,
    SourceUnavailable,
    TemplateId,
    TenantSettings,
    TwilioConfig,
)

log = logging.getLogger("notifyd.tenant_config")

REFRESH_AT: Final = 0.8
"""Share of the TTL after which a read starts a background refresh."""
RETRY_AFTER: Final = 5.0
"""Seconds (at most the TTL) before a failed fetch is tried again for the same tenant; each
further failure in a row doubles the pause, up to `RETRY_MAX`."""
RETRY_MAX: Final = 60.0
"""The longest pause (at most the TTL) between fetches of a tenant whose source keeps failing
or answering a refused document: the source, perhaps down, is not hammered."""
IDLE_TTLS: Final = 10
"""A copy read within this many TTLs is refreshed in the background before it expires
(`refresh_due`); one idle longer is refreshed by its next read instead."""
REFRESH_CONCURRENCY: Final = 32
"""Background refreshes in flight at once per instance (after a start, many copies fall
due together; the source sees them spread out)."""
JWT_TTL: Final = 60
"""Seconds a JWT notifyd signs for one fetch is valid (no NOTIFYD_TENANT_CONFIG_TOKEN)."""
ERROR_MAX: Final = 300
"""Characters of a refusal's reason kept for the log and `last_error`."""


class Unreachable(Exception):
    """The source did not answer usefully (connection, deadline, an HTTP status)."""


class Refused(Exception):
    """The source answered a document notifyd refuses whole; `reason` says why."""


def document_url(template: str, tenant_id: str) -> str:
    """The URL template with the tenant's id percent-encoded (ids may hold `/`, `?`, `#`)."""
    return template.replace("{tenant_id}", quote(tenant_id, safe=""))


@dataclass(frozen=True)
class Fetched:
    settings: TenantSettings
    etag: str | None


def to_settings(document: TenantConfigDocument) -> TenantSettings:
    """The typed settings of a valid document; `sourced` names what it gave."""
    smtp = document.smtp
    twilio = document.twilio
    given = {name for name in SOURCED_FIELDS if getattr(document, name) is not None}
    templates: dict[TemplateId, SourcedTemplate] = {}
    for t in document.templates or ():
        locale = tags.normalize_locale(t.locale or "")
        templates[(t.template_key, t.channel, locale)] = SourcedTemplate(
            t.subject, t.text_body, t.html_body, locale
        )
    if document.templates is not None:
        given.add("templates")
    return TenantSettings(
        smtp=None
        if smtp is None
        else SmtpConfig(
            host=smtp.host,
            port=smtp.port,
            username=smtp.username or "",
            password=smtp.password or "",
            use_tls=bool(smtp.use_tls),
            use_ssl=bool(smtp.use_ssl),
            from_email=smtp.from_email,
        ),
        twilio=None
        if twilio is None
        else TwilioConfig(
            account_sid=twilio.account_sid,
            auth_token=twilio.auth_token or "",
            from_number=twilio.from_number,
        ),
        default_region=document.default_region,
        default_locale=None
        if document.default_locale is None
        else tags.normalize_locale(document.default_locale),
        templates=templates,
        sourced=frozenset(given),
    )


def _short(text: str) -> str:
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 3] + "..."


class Source:
    """One HTTP fetch of one tenant's document, validated whole."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession, egress: Egress) -> None:
        self._settings = settings
        self._url = settings.tenant_config_url
        self._token = settings.tenant_config_token
        self._max_bytes = settings.tenant_config_max_bytes
        self._timeout = aiohttp.ClientTimeout(
            total=settings.tenant_config_timeout,
            sock_connect=settings.tenant_config_connect_timeout,
        )
        self._session = session
        self._egress = egress
        self._reader = Reader(
            document_model(settings),
            {**PATTERN_MESSAGES, **TEMPLATE_PATTERNS, **TENANT_PATTERNS},
            document_problems,
        )
        self._limits = RenderLimits(
            max_output=settings.template_max_output, max_steps=settings.template_max_steps
        )

    async def fetch(self, tenant_id: str, etag: str | None) -> Fetched | None:
        """The tenant's document, or None when it is unchanged (304 to `etag`).
        Raises `Unreachable` or `Refused`."""
        headers = {"Accept": "application/json"}
        bearer = self._bearer(tenant_id)
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        if etag:
            headers["If-None-Match"] = etag
        try:
            async with self._session.get(
                document_url(self._url, tenant_id),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                if response.status == 304 and etag:
                    return None
                if response.status == 404:
                    return Fetched(TenantSettings(), response.headers.get("ETag"))
                if response.status != 200:
                    raise Unreachable(f"the source answered HTTP {response.status}")
                raw = await self._body(response)
                new_etag = response.headers.get("ETag")
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise Unreachable(f"cannot fetch from the source ({kind})") from None
        settings = self._validate(raw)
        await self._check_egress(settings)
        return Fetched(settings, new_etag)

    def _bearer(self, tenant_id: str) -> str:
        """NOTIFYD_TENANT_CONFIG_TOKEN; without one, where the deployment shares JWT_SECRET
        with its auth service, a JWT notifyd signs for this fetch alone (`JWT_TTL` seconds,
        the configured claim names: the fetched tenant, user `notifyd`, role `service`)."""
        if self._token or not self._settings.jwt_secret:
            return self._token
        return mint_token(
            self._settings, tenant_id=tenant_id, user_id="notifyd", role="service", ttl=JWT_TTL
        )

    async def _body(self, response: aiohttp.ClientResponse) -> bytes:
        if (response.content_length or 0) > self._max_bytes:
            raise Refused(f"the document is larger than {self._max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_chunked(65536):
            size += len(chunk)
            if size > self._max_bytes:
                raise Refused(f"the document is larger than {self._max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _validate(self, raw: bytes) -> TenantSettings:
        try:
            document = self._reader.json(raw)
        except NotAnObject as exc:
            raise Refused(f"not a JSON object: {exc.detail}") from None
        except Invalid as exc:
            raise Refused(_short(str(exc))) from None
        errors = []
        for index, t in enumerate(document.templates or ()):
            source = TemplateSource(t.subject, t.text_body, t.html_body)
            name = f"template {t.template_key!r} ({t.channel})"
            errors += [
                f"templates[{index}].{e.field}: {e.reason}"
                for e in render.check(source, limits=self._limits, name=name)
            ]
        if errors:
            raise Refused(_short("; ".join(errors)))
        return to_settings(document)

    async def _check_egress(self, settings: TenantSettings) -> None:
        """The relay a document names is a tenant's value: the policy a PUT applies."""
        if settings.smtp is None:
            return
        try:
            await self._egress.check(settings.smtp.host, settings.smtp.port)
        except EgressRefused as exc:
            raise Refused(f"smtp.{exc.field}: {exc.message}") from None
        except ResolveFailed:
            pass  # as for a PUT: every connection checks again, which is the check that counts


@dataclass
class _Entry:
    settings: TenantSettings
    etag: str | None
    refresh_at: float  # monotonic: a read after it refreshes in the background
    expires: float  # monotonic: a read after it waits for a refresh (else uses this, stale)
    slow_noted: bool = False  # the source was slower than this copy's TTL: no read waits again
    failures: int = 0  # fetches failed in a row since the last good one
    read_at: float = 0.0  # monotonic: the last read (an idle copy is not kept fresh)


class TenantConfigs:
    """Per tenant, the source's last good document; see the module's docstring."""

    def __init__(
        self,
        source: Source,
        redis: Redis,
        keys: Keys,
        metrics: Metrics,
        ttl: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        stale_wait: float = 1.0,
    ) -> None:
        """`stale_wait`: how long a read of a copy past its TTL waits for the refresh before
        it goes on with that copy (the source slow)."""
        self._stale_wait = stale_wait
        self._source = source
        self._redis = redis
        self._keys = keys
        self._metrics = metrics
        self._ttl = ttl
        self._retry = min(RETRY_AFTER, ttl)
        self._retry_max = min(RETRY_MAX, ttl)
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        # never fetched: until when not to try again, the reason, failures in a row
        self._failed: dict[str, tuple[float, str, int]] = {}
        self._loading: dict[str, asyncio.Task[TenantSettings]] = {}

    async def get(self, tenant_id: str) -> TenantSettings:
        """The source's settings for the tenant (last good copy when the source fails);
        `SourceUnavailable` when there has never been one."""
        now = self._clock()
        entry = self._entries.get(tenant_id)
        if entry is not None:
            entry.read_at = now
            if now >= entry.refresh_at:
                in_flight = tenant_id in self._loading
                task = self._refresh(tenant_id)
                if now >= entry.expires:
                    return await self._expired(tenant_id, entry, task, waits=not in_flight)
            return entry.settings
        failed = self._failed.get(tenant_id)
        if failed is not None and now < failed[0]:
            raise SourceUnavailable(failed[1])
        try:
            return await asyncio.shield(self._refresh(tenant_id))
        except (Unreachable, Refused) as exc:
            raise SourceUnavailable(
                f"tenant configuration not fetched yet: {exc}; retrying"
            ) from None

    def refresh_due(self) -> int:
        """Start the background refresh of each copy past `REFRESH_AT` of its TTL that was
        read in the last `IDLE_TTLS` TTLs, at most `REFRESH_CONCURRENCY` in flight: a tenant
        in use never has a send wait for its refresh. Returns how many were started."""
        now = self._clock()
        budget = REFRESH_CONCURRENCY - len(self._loading)
        started = 0
        for tenant_id, entry in list(self._entries.items()):
            if started >= budget:
                break
            if (
                now >= entry.refresh_at
                and now - entry.read_at <= self._ttl * IDLE_TTLS
                and tenant_id not in self._loading
            ):
                self._refresh(tenant_id)
                started += 1
        return started

    @property
    def refresh_interval(self) -> float:
        """How often `refresh_due` should run: a few times within the TTL's last fifth."""
        return min(self._ttl * (1 - REFRESH_AT) / 2, 5.0)

    async def _expired(
        self, tenant_id: str, entry: _Entry, task: asyncio.Task[TenantSettings], *, waits: bool
    ) -> TenantSettings:
        """A copy past its TTL: the refresh's result when it comes within `stale_wait`, else
        (the source slow or failing) the last good copy. Only the read that started the
        fetch waits (`waits`): one already running when the copy expired is a slow source,
        and reads meanwhile take the copy at once; so do reads after a wait ran out, until a
        fetch replaces the copy (a slow source costs one send one `stale_wait`, not every
        send until its answer comes)."""
        if entry.slow_noted or not waits:
            self._note_slow(tenant_id, entry)
            return entry.settings
        try:
            async with asyncio.timeout(self._stale_wait):
                # shield: neither this deadline nor a waiter's cancellation stops the fetch
                return await asyncio.shield(task)
        except (Unreachable, Refused):
            pass  # `_failure` counted and logged it
        except TimeoutError:
            self._note_slow(tenant_id, entry)
        return self._entries[tenant_id].settings

    def _note_slow(self, tenant_id: str, entry: _Entry) -> None:
        """Counted and logged once per copy: the source is slower than the copy's TTL."""
        if not entry.slow_noted:
            entry.slow_noted = True
            self._metrics.tenant_config_stale.inc()
            log.warning(
                "tenant configuration source slow: sends go on with the last good copy",
                extra={"tenant_id": tenant_id, "waited": self._stale_wait},
            )

    def _refresh(self, tenant_id: str) -> asyncio.Task[TenantSettings]:
        """The fetch in flight for the tenant, started when there is none (single flight)."""
        task = self._loading.get(tenant_id)
        if task is None:
            task = asyncio.create_task(self._load(tenant_id), name=f"tenant-config:{tenant_id}")
            self._loading[tenant_id] = task
            task.add_done_callback(lambda done: self._forget(tenant_id, done))
        return task

    async def _load(self, tenant_id: str) -> TenantSettings:
        entry = self._entries.get(tenant_id)
        try:
            if entry is not None and entry.etag and await self._shared_still(tenant_id, entry):
                return entry.settings
            fetched = await self._source.fetch(tenant_id, entry.etag if entry else None)
        except Unreachable as exc:
            self._metrics.tenant_config_fetches.labels("unreachable").inc()
            self._failure(tenant_id, entry, str(exc))
            raise
        except Refused as exc:
            self._metrics.tenant_config_fetches.labels("refused").inc()
            log.warning(
                "tenant configuration refused: nothing changed",
                extra={"tenant_id": tenant_id, "reason": str(exc)},
            )
            self._failure(tenant_id, entry, f"the source's document was refused: {exc}")
            raise
        now = self._clock()
        if fetched is None:
            assert entry is not None
            self._metrics.tenant_config_fetches.labels("not_modified").inc()
            settings, etag = entry.settings, entry.etag
        else:
            self._metrics.tenant_config_fetches.labels("fetched").inc()
            settings, etag = fetched.settings, fetched.etag
        self._store(
            tenant_id,
            _Entry(
                settings,
                etag,
                now + self._ttl * REFRESH_AT,
                now + self._ttl,
                read_at=now if entry is None else entry.read_at,
            ),
        )
        self._failed.pop(tenant_id, None)
        if etag:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._redis.set(
                    self._keys.tenant_config(tenant_id), etag, px=max(1, int(self._ttl * 1000))
                )
        return settings

    async def _shared_still(self, tenant_id: str, entry: _Entry) -> bool:
        """Whether another instance validated this very version at the source recently
        enough: then this copy is extended to that validation's expiry, without a fetch."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self._keys.tenant_config(tenant_id))
                pipe.pttl(self._keys.tenant_config(tenant_id))
                shared, left_ms = await pipe.execute()
        except (RedisError, OSError, TimeoutError):
            return False
        if shared is None or shared.decode() != entry.etag:
            return False
        left = left_ms / 1000
        if left <= self._ttl * (1 - REFRESH_AT):
            return False  # about to expire: ask the source (If-None-Match) instead
        now = self._clock()
        entry.expires = now + left
        entry.refresh_at = now + left - self._ttl * (1 - REFRESH_AT)
        self._metrics.tenant_config_fetches.labels("shared").inc()
        return True

    def _pause(self, failures: int) -> float:
        """Seconds before the next fetch after `failures` in a row (1, 2, …)."""
        return min(self._retry * float(2 ** min(failures - 1, 16)), self._retry_max)

    def _failure(self, tenant_id: str, entry: _Entry | None, reason: str) -> None:
        now = self._clock()
        if entry is None:
            previous = self._failed.pop(tenant_id, None)
            failures = 1 if previous is None else previous[2] + 1
            if len(self._failed) >= self._max_entries:
                self._failed = {t: f for t, f in self._failed.items() if f[0] > now}
                if len(self._failed) >= self._max_entries:
                    del self._failed[next(iter(self._failed))]
            self._failed[tenant_id] = (now + self._pause(failures), reason, failures)
            log.warning(
                "tenant configuration unavailable: the tenant's sends are retried",
                extra={"tenant_id": tenant_id, "reason": reason},
            )
            return
        if now >= entry.expires:
            self._metrics.tenant_config_stale.inc()
            log.warning(
                "tenant configuration source failing: sends go on with the last good copy",
                extra={"tenant_id": tenant_id, "reason": reason},
            )
        # try again after a pause, not on every read meanwhile
        entry.failures += 1
        pause = self._pause(entry.failures)
        entry.refresh_at = min(entry.refresh_at, now) + pause
        entry.expires = max(entry.expires, now + pause)

    def _store(self, tenant_id: str, entry: _Entry) -> None:
        if len(self._entries) >= self._max_entries and tenant_id not in self._entries:
            del self._entries[next(iter(self._entries))]  # the oldest insertion
        self._entries[tenant_id] = entry

    def _forget(self, tenant_id: str, done: asyncio.Task[TenantSettings]) -> None:
        if self._loading.get(tenant_id) is done:
            del self._loading[tenant_id]
        if not done.cancelled():
            done.exception()  # retrieved: a background refresh nobody awaited logs no warning

    async def close(self) -> None:
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
