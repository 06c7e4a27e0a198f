"""The content of one notification: as given, or rendered from a template.

The REST send path (to refuse a template that cannot render before a 2xx) and the dispatcher
(to render what it delivers) both call `compose`, so the two can never disagree about what a
notification says. Both resolve a template with the tenant's default locale
(`default_locale` of its settings, else NOTIFYD_DEFAULT_LOCALE).

A dispatcher batch renders many notifications made from the same few templates (a minute of
interview reminders names two), so `Composer` resolves each distinct template once per batch:
one query per row was one PostgreSQL round trip per reminder notification, awaited in turn.

Every render is bounded by NOTIFYD_TEMPLATE_MAX_OUTPUT and NOTIFYD_TEMPLATE_MAX_STEPS
(`render_limits`); a template over them, or failing in any way, is a `TemplateError`.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from notifyd.providers.builtin_templates import builtin
from notifyd.providers.render import Rendered, TemplateError, TemplateSource, render
from notifyd.providers.render_bounds import RenderLimits
from notifyd.settings import Settings
from notifyd.store import templates
from notifyd.store.pool import Executor
from notifyd.store.tenants import SourcedTemplate, TemplateId, TenantSettings, load_redacted

# what resolving a template depends on, besides the composer's default locale
_TemplateKey = tuple[str, str, str, str | None]  # tenant, template key, channel, locale


def render_limits(settings: Settings) -> RenderLimits:
    """What one rendered field may cost, from NOTIFYD_TEMPLATE_MAX_OUTPUT / _MAX_STEPS."""
    return _render_limits(settings.template_max_output, settings.template_max_steps)


@functools.lru_cache(maxsize=8)
def _render_limits(max_output: int, max_steps: int) -> RenderLimits:
    """One value per pair of settings: every send asks for it (a REST send builds none)."""
    return RenderLimits(max_output=max_output, max_steps=max_steps)


async def resolve(
    executor: Executor,
    tenant_id: str,
    template_key: str,
    channel: str,
    locale: str | None,
    default_locale: str,
    sourced: Mapping[TemplateId, SourcedTemplate] | None = None,
) -> TemplateSource | None:
    """The tenant's template by locale fallback (`store.templates.resolve`), else notifyd's
    built-in, else None: the whole fallback order in one place.

    `sourced`: the tenant configuration source's templates; at each locale of the fallback
    order the source's template wins over a stored one, so a stored `pt-BR` still beats the
    source's default-locale template for a `pt-BR` send."""
    order = templates.locale_candidates(locale, default_locale)
    given = None
    for rank, candidate in enumerate(order if sourced else ()):
        found = sourced.get((template_key, channel, candidate)) if sourced else None
        if found is not None:
            given = (rank, found)
            break
    stored = await templates.resolve(
        executor, tenant_id, template_key, channel, locale, default_locale
    )
    if given is not None and (stored is None or given[0] <= order.index(stored.locale)):
        t = given[1]
        return TemplateSource(t.subject, t.text_body, t.html_body, t.locale)
    if stored is None:
        return builtin(template_key, channel)
    return TemplateSource(stored.subject, stored.text_body, stored.html_body, stored.locale)


class Composer:
    """`compose` for many notifications, each distinct template resolved once.

    Meant to live as long as one batch: a template edited meanwhile is seen by the next batch,
    as it would be by the next notification composed alone."""

    def __init__(
        self,
        executor: Executor,
        fallback_locale: str,
        *,
        limits: RenderLimits,
        default_locales: Mapping[str, str] | None = None,
        tenants: Callable[[str], Awaitable[TenantSettings]] | None = None,
        known: Mapping[str, TenantSettings] | None = None,
    ) -> None:
        """`fallback_locale` (NOTIFYD_DEFAULT_LOCALE) serves a tenant that set no default
        locale of its own; `default_locales` gives tenants' defaults already known (else each
        tenant's stored settings are read once, without opening any secret); `limits` bound
        each render (`render_limits`); `tenants` reads a tenant's settings with the tenant
        configuration source's over them (its default locale and templates), `known` gives
        some already read."""
        self._tenants = tenants
        self._known: dict[str, TenantSettings] = dict(known or {})
        self._executor = executor
        self._limits = limits
        self._fallback_locale = fallback_locale
        self._default_locales: dict[str, str] = dict(default_locales or {})
        self._sources: dict[_TemplateKey, TemplateSource | None] = {}

    async def compose(
        self,
        *,
        tenant_id: str,
        channel: str,
        template_key: str | None,
        context: Mapping[str, Any] | None,
        subject: str | None,
        message: str | None,
        locale: str | None,
    ) -> Rendered:
        """As the module's `compose`, with the tenant's default locale."""
        if template_key is None:
            return Rendered(subject=subject, text=message or "", html=None)
        key = (tenant_id, template_key, channel, locale)
        if key in self._sources:
            source = self._sources[key]
        else:
            source = self._sources[key] = await resolve(
                self._executor,
                tenant_id,
                template_key,
                channel,
                locale,
                await self._default_locale(tenant_id),
                (await self._tenant(tenant_id)).templates,
            )
        if source is None:
            raise TemplateError(
                f"unknown template_key {template_key!r} for channel {channel}",
                field="template_key",
            )
        origin = "built-in" if source.locale is None else (source.locale or "default locale")
        rendered = render(
            source,
            context or {},
            limits=self._limits,
            name=f"template {template_key!r} ({channel}, {origin})",
        )
        if rendered.subject is None and subject is not None:
            return Rendered(subject=subject, text=rendered.text, html=rendered.html)
        return rendered

    async def _tenant(self, tenant_id: str) -> TenantSettings:
        tenant = self._known.get(tenant_id)
        if tenant is None:
            if self._tenants is not None:
                tenant = await self._tenants(tenant_id)
            else:
                tenant = (await load_redacted(self._executor, tenant_id)).settings
            self._known[tenant_id] = tenant
        return tenant

    async def _default_locale(self, tenant_id: str) -> str:
        locale = self._default_locales.get(tenant_id)
        if locale is None:
            tenant = await self._tenant(tenant_id)
            locale = self._default_locales[tenant_id] = (
                tenant.default_locale or self._fallback_locale
            )
        return locale


async def compose(
    executor: Executor,
    *,
    tenant_id: str,
    channel: str,
    template_key: str | None,
    context: Mapping[str, Any] | None,
    subject: str | None,
    message: str | None,
    locale: str | None,
    default_locale: str,
    limits: RenderLimits,
    tenant: TenantSettings | None = None,
) -> Rendered:
    """Subject, text and HTML for one notification on `channel`.

    Without `template_key` the subject and message are used as given (no HTML). With it, the
    tenant's template (or notifyd's built-in) is resolved by locale and rendered with
    `context`; `message` is then ignored, and `subject` is used only when the template has
    none; `tenant`: its settings, whose sourced templates win (`resolve`). Raises
    `TemplateError` for an unknown key, a missing variable or a broken template.
    """
    composer = Composer(
        executor,
        default_locale,
        limits=limits,
        default_locales={tenant_id: default_locale},
        known=None if tenant is None else {tenant_id: tenant},
    )
    return await composer.compose(
        tenant_id=tenant_id,
        channel=channel,
        template_key=template_key,
        context=context,
        subject=subject,
        message=message,
        locale=locale,
    )
