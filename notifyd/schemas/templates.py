"""Templates: the create-or-replace body and the preview body (a stored template or a draft).

Whether a template compiles, and whether a stored one exists, is not the body's shape: the
handler says so after the model (422s of its own, `http.templates`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from notifyd import tags
from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import Channel, Message, TemplateKey, anchored, bounded, text
from notifyd.settings import Settings

TEMPLATE_LOCALE_PATTERN = anchored("|" + tags.LOCALE.pattern)
"""A template's locale: a language tag, or "" for the default (the fallback row)."""

CURSOR_PATTERN = r"^[^/\x00]*/[^/\x00]*/[^/\x00]*$"
"""A page's cursor: the last template's `key/channel/locale` (the Link header's `after`)."""

PATTERN_MESSAGES: dict[str, Message] = {
    TEMPLATE_LOCALE_PATTERN: 'must be a locale such as "en" or "pt-BR", or "" for the default',
    CURSOR_PATTERN: "must be a cursor taken from a previous page's Link",
}

TemplateLocale = Annotated[
    str, Field(max_length=tags.LOCALE_MAX_LENGTH, pattern=TEMPLATE_LOCALE_PATTERN)
]

_SOURCE = ("subject", "text_body", "html_body")


class TemplatePut(BaseModel):
    """A template for the path's key and channel, in `locale` ("" or left out: the default).
    It must compile."""

    model_config = ConfigDict(extra="forbid")

    locale: TemplateLocale | None = None
    subject: str | None = None
    text_body: str
    html_body: str | None = None


def _source(settings: Settings, model: type[Any], *, required: bool) -> type[Any]:
    """`model` with the subject and body lengths that are settings."""
    body = Annotated[str, text(settings.notification_max_length)]
    return bounded(
        model,
        subject=(Annotated[str, text(settings.subject_max_length, header=True)] | None, None),
        text_body=(body, ...) if required else (body | None, None),
        html_body=(body | None, None),
        **(
            {
                "context": (
                    Annotated[dict[str, Any], Field(max_length=settings.context_max_keys)] | None,
                    None,
                )
            }
            if "context" in model.model_fields
            else {}
        ),
    )


def put_model(settings: Settings) -> type[TemplatePut]:
    """`TemplatePut` with `subject_max_length` and `notification_max_length`."""
    return _source(settings, TemplatePut, required=True)


def _null(*names: str) -> dict[str, Any]:
    return {name: {"type": "null"} for name in names}


class TemplatePreview(BaseModel):
    """Render a stored template (`template_key` + `channel`, optionally `locale`) or an inline
    draft (`text_body`, optionally `subject` and `html_body`), with `context`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # `preview_problems`, for the document
            "oneOf": [
                {
                    "required": ["template_key", "channel"],
                    "properties": {
                        "template_key": {"type": "string"},
                        "channel": {"type": "string"},
                        **_null(*_SOURCE),
                    },
                },
                {
                    "required": ["text_body"],
                    "properties": {
                        "text_body": {"type": "string"},
                        **_null("template_key", "channel", "locale"),
                    },
                },
            ]
        },
    )

    template_key: TemplateKey | None = None
    channel: Channel | None = None
    locale: TemplateLocale | None = None
    subject: str | None = None
    text_body: str | None = None
    html_body: str | None = None
    context: dict[str, Any] | None = None


def preview_model(settings: Settings) -> type[TemplatePreview]:
    """`TemplatePreview` with the text lengths and `context_max_keys`."""
    return _source(settings, TemplatePreview, required=False)


def preview_problems(values: Mapping[str, Any], at_fault: Collection[str] = ()) -> list[FieldError]:
    """A stored template or a draft, not both; each with what it needs."""
    found: list[FieldError] = []
    if "template_key" in at_fault or values.get("template_key") is not None:
        if values.get("channel") is None and "channel" not in at_fault:
            found.append(FieldError("channel", "is required"))
        for name in _SOURCE:
            if values.get(name) is not None:
                found.append(
                    FieldError(name, "is not used with template_key (send one or the other)")
                )
        return found
    if values.get("text_body") is None and "text_body" not in at_fault:
        found.append(FieldError("text_body", "is required unless template_key is given"))
    for name in ("channel", "locale"):
        if values.get(name) is not None:
            found.append(FieldError(name, "is only used with template_key"))
    return found


class TemplateQuery(BaseModel):
    """A page of the tenant's templates in key, channel and locale order, optionally one key's
    or one channel's. Unknown parameters are ignored."""

    limit: int = 50
    template_key: TemplateKey | None = None
    channel: Channel | None = None
    after: Annotated[str, Field(max_length=300, pattern=CURSOR_PATTERN)] | None = Field(
        None, description="Cursor: taken from the previous page's Link header."
    )


class TemplateItemQuery(BaseModel):
    """Which locale of a template (its path names the key and channel)."""

    locale: TemplateLocale = Field("", description='A language tag, or "" for the default.')


class Template(BaseModel):
    """A template as the API shows it (`http.templates.template_json`, `sourced_json`)."""

    template_key: str
    channel: Channel
    locale: str = Field(description='A language tag, or "" for the default.')
    subject: str | None
    text_body: str
    html_body: str | None
    created_at: datetime | None = Field(description="null for a template from the source.")
    updated_at: datetime | None = Field(description="null for a template from the source.")
    source: Literal["stored", "tenant_config"] = Field(
        description="tenant_config: from NOTIFYD_TENANT_CONFIG_URL, read-only here."
    )


class Rendered(BaseModel):
    """A preview: what the template makes of the context."""

    subject: str | None
    text: str
    html: str | None
