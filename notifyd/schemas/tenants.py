"""The tenant's own delivery settings: the PUT body (an SMTP relay, a Twilio account, defaults).

A section left out is kept, null falls back to the global setting: the handler tells the two
apart by `model_fields_set`. Whether a token is stored already, and whether the relay's
address is one the egress policy allows, is state: the handler answers those.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt
from pydantic_core import PydanticCustomError

from notifyd import tags
from notifyd.schemas.contacts import TimeZone
from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import SAFE_EMAIL, WHOLE, Flag, Locale, Message, anchored

_UNSAFE = tags.HEADER_UNSAFE.pattern.removeprefix("[").removesuffix("]")
SINGLE_LINE_PATTERN = rf"^[^{_UNSAFE}]*$"
"""May be empty; no character that ends a mail header or an SMTP command line."""
HOST_PATTERN = r"^[A-Za-z0-9\[][A-Za-z0-9.:_\[\]-]{0,252}$"
ACCOUNT_SID_PATTERN = r"^AC[0-9a-fA-F]{32}$"
# Loose on purpose: the SMS provider normalises to E.164 with the tenant's default region.
PHONE_PATTERN = r"^\+?[0-9(][0-9 ().-]{4,30}$"
PHONE_DIGITS = 5
REGION_PATTERN = r"^[A-Z]{2}$"
FROM_EMAIL_PATTERN = anchored(SAFE_EMAIL)
"""`tags.EMAIL`, header-safe: a From: address."""

_PHONE_MESSAGE = "must be a phone number, e.g. +14155550100 or 4155550100"
PATTERN_MESSAGES: dict[str, Message] = {
    SINGLE_LINE_PATTERN: lambda value: tags.header_problem(value) or "must be one line",
    HOST_PATTERN: "must be a host name or IP address",
    ACCOUNT_SID_PATTERN: "must be AC followed by 32 hexadecimal digits",
    PHONE_PATTERN: _PHONE_MESSAGE,
    REGION_PATTERN: "must be a two-letter country code such as US or GB",
    FROM_EMAIL_PATTERN: "must be an email address",
}


def _enough_digits(number: str) -> str:
    if sum(c.isdigit() for c in number) < PHONE_DIGITS:
        raise PydanticCustomError("phone_digits", _PHONE_MESSAGE)
    return number


_TLS_TWICE = "use_tls (STARTTLS) and use_ssl (implicit TLS) exclude each other"

SingleLine = Annotated[str, Field(pattern=SINGLE_LINE_PATTERN)]


class SmtpSettings(BaseModel):
    """The tenant's SMTP relay. `password` left out (or null) keeps the stored one."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # `settings_problems`, for the document
            "not": {
                "required": ["use_tls", "use_ssl"],
                "properties": {"use_tls": {"const": True}, "use_ssl": {"const": True}},
            }
        },
    )

    host: Annotated[str, Field(max_length=253, pattern=HOST_PATTERN)]
    port: Annotated[StrictInt, Field(ge=1, le=65535), WHOLE]
    username: Annotated[SingleLine, Field(max_length=256)] | None = None
    password: Annotated[SingleLine, Field(max_length=1024)] | None = Field(
        None, json_schema_extra={"writeOnly": True}, description="Left out: keep the stored one"
    )
    password_set: Flag | None = Field(None, json_schema_extra={"readOnly": True})
    use_tls: Flag | None = Field(None, description="STARTTLS")
    use_ssl: Flag | None = Field(None, description="Implicit TLS")
    from_email: Annotated[str, Field(max_length=254, pattern=FROM_EMAIL_PATTERN)]


class TwilioSettings(BaseModel):
    """The tenant's Twilio account. `auth_token` left out (or null) keeps the stored one."""

    model_config = ConfigDict(extra="forbid")

    account_sid: Annotated[str, Field(max_length=34, pattern=ACCOUNT_SID_PATTERN)]
    auth_token: (
        Annotated[str, Field(min_length=1, max_length=256, pattern=SINGLE_LINE_PATTERN)] | None
    ) = Field(
        None, json_schema_extra={"writeOnly": True}, description="Left out: keep the stored one"
    )
    auth_token_set: Flag | None = Field(None, json_schema_extra={"readOnly": True})
    from_number: Annotated[
        str,
        Field(
            max_length=40,
            pattern=PHONE_PATTERN,
            json_schema_extra={"allOf": [{"pattern": rf"^(?:[^0-9]*[0-9]){{{PHONE_DIGITS}}}"}]},
        ),
        AfterValidator(_enough_digits),
    ]


class TenantSettings(BaseModel):
    """A section left out of a PUT is kept; null falls back to the global setting."""

    model_config = ConfigDict(extra="forbid")

    smtp: SmtpSettings | None = None
    twilio: TwilioSettings | None = None
    default_region: Annotated[str, Field(pattern=REGION_PATTERN)] | None = None
    default_locale: Locale | None = None
    default_timezone: TimeZone | None = Field(
        None, description="Quiet hours of a recipient without a time zone are read in this one."
    )
    sourced: list[str] | None = Field(
        None,
        json_schema_extra={"readOnly": True},
        description="The fields the tenant configuration source gives (read-only here)",
    )


def settings_problems(
    values: Mapping[str, Any], at_fault: Collection[str] = ()
) -> list[FieldError]:
    """STARTTLS and implicit TLS exclude each other."""
    smtp = values.get("smtp")
    if isinstance(smtp, SmtpSettings):
        smtp = smtp.__dict__
    if isinstance(smtp, Mapping) and smtp.get("use_tls") is True and smtp.get("use_ssl") is True:
        return [FieldError("smtp.use_ssl", _TLS_TWICE)]
    return []
