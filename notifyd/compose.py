"""The content of one notification: as given, or rendered from a template.

The REST send path (to refuse a template that cannot render before a 2xx) and the dispatcher
(to render what it delivers) both call `compose`, so the two can never disagree about what a
notification says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from notifyd.providers.render import Rendered, TemplateError, render
from notifyd.store import templates
from notifyd.store.pool import Executor


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
) -> Rendered:
    """Subject, text and HTML for one notification on `channel`.

    Without `template_key` the subject and message are used as given (no HTML). With it, the
    tenant's template (or notifyd's built-in) is resolved by locale and rendered with
    `context`; `message` is then ignored, and `subject` is used only when the template has
    none. Raises `TemplateError` for an unknown key, a missing variable or a broken template.
    """
    if template_key is None:
        return Rendered(subject=subject, text=message or "", html=None)
    source = await templates.resolve(
        executor, tenant_id, template_key, channel, locale, default_locale
    )
    if source is None:
        raise TemplateError(
            f"unknown template_key {template_key!r} for channel {channel}", field="template_key"
        )
    origin = "built-in" if source.locale is None else (source.locale or "default locale")
    rendered = render(
        source, context or {}, name=f"template {template_key!r} ({channel}, {origin})"
    )
    if rendered.subject is None and subject is not None:
        return Rendered(subject=subject, text=rendered.text, html=rendered.html)
    return rendered
