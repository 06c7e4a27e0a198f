"""The tenant configuration document an auth service serves (NOTIFYD_TENANT_CONFIG_URL).

Every section is validated by the model the API validates the same values with: `smtp` and
`twilio` are the tenant settings API's (`schemas.tenants`), a template is the template PUT's
body (`schemas.templates.TemplatePut`, with the same length settings) plus its key and
channel. A section left out or null falls back to what notifyd stores for the tenant. One
field at fault refuses the whole document (`tenant_config` keeps the last good one).

The document's JSON Schema is published in /openapi.json as `TenantConfigDocument`: the
schema an auth service implements.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from notifyd import tags
from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import Channel, Locale, TemplateKey, bounded, text
from notifyd.schemas.templates import TemplateLocale
from notifyd.schemas.tenants import (
    REGION_PATTERN,
    SmtpSettings,
    TwilioSettings,
    settings_problems,
)
from notifyd.settings import Settings

TEMPLATES_MAX = 500
"""Templates one document may hold (docs/limits.md)."""

SOURCED_FIELDS = ("smtp", "twilio", "default_region", "default_locale")
"""The tenant settings a document may give (each wins over the stored one when given)."""


class SourcedTemplate(BaseModel):
    """One template: `TemplatePut`'s fields plus the key and channel a PUT has in its path."""

    model_config = ConfigDict(extra="forbid")

    template_key: TemplateKey
    channel: Channel
    locale: TemplateLocale | None = Field(None, description='Left out or "": the default')
    subject: str | None = None
    text_body: str
    html_body: str | None = None


class TenantConfigDocument(BaseModel):
    """What `GET NOTIFYD_TENANT_CONFIG_URL` answers for one tenant; every field optional."""

    model_config = ConfigDict(extra="forbid")

    smtp: SmtpSettings | None = Field(
        None,
        description="The tenant's relay; `password` in clear (a server without AUTH: left out)",
    )
    twilio: TwilioSettings | None = Field(
        None, description="The tenant's Twilio account; `auth_token` is required here"
    )
    default_region: Annotated[str, Field(pattern=REGION_PATTERN)] | None = None
    default_locale: Locale | None = None
    templates: list[SourcedTemplate] | None = Field(None, max_length=TEMPLATES_MAX)


def document_model(settings: Settings) -> type[TenantConfigDocument]:
    """`TenantConfigDocument` with the template lengths that are settings (as `put_model`)."""
    body = Annotated[str, text(settings.notification_max_length)]
    template = bounded(
        SourcedTemplate,
        subject=(Annotated[str, text(settings.subject_max_length, header=True)] | None, None),
        text_body=(body, ...),
        html_body=(body | None, None),
    )
    return bounded(
        TenantConfigDocument,
        templates=(list[template] | None, Field(None, max_length=TEMPLATES_MAX)),  # type: ignore[valid-type]
    )


def document_problems(
    values: Mapping[str, Any], at_fault: Collection[str] = ()
) -> list[FieldError]:
    """The settings API's rules, a Twilio token present, one template per key/channel/locale."""
    found = settings_problems(values, at_fault)
    twilio = values.get("twilio")
    if isinstance(twilio, TwilioSettings) and not twilio.auth_token:
        found.append(FieldError("twilio.auth_token", "is required"))
    seen: set[tuple[str, str, str]] = set()
    for index, template in enumerate(values.get("templates") or ()):
        if not isinstance(template, SourcedTemplate):
            continue
        key = (
            template.template_key,
            template.channel,
            tags.normalize_locale(template.locale or ""),
        )
        if key in seen:
            found.append(
                FieldError(f"templates[{index}]", "repeats a template_key, channel and locale")
            )
        seen.add(key)
    return found
