"""The contact rule: how a person is reached, written once.

`{email?, phone?, timezone?, locale?, name?}` is what a reminder's candidate and employer
contacts (`schemas.reminders`), a stored recipient (`schemas.recipients`) and an ingested
event's recipient (`EventRecipient`, with a `user_id`) hold. Every value may reach a mail
header, so none holds a line break or another control character. The rule is in the
document: an email address by its pattern, a time zone as the `enum` of the IANA zones this
host's tz database knows, a locale as a language tag, a phone by its loose shape. Whether a
phone is a number in the tenant's region (E.164 after `providers.phones.to_e164`) is the
tenant's state: the handler answers it, a 422 of type `unsendable`.
"""

from __future__ import annotations

import zoneinfo
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from notifyd import tags
from notifyd.schemas.fields import SAFE_EMAIL, Locale, Message, bounded, opaque_id, text

VALUE_MAX_LENGTH = 320
"""Characters in a name (an email address is at most `EMAIL_MAX_LENGTH`)."""
EMAIL_MAX_LENGTH = 254

# white space str.strip() takes off that is not also header-unsafe (tab, the Unicode spaces)
_BLANK = r"\t \xa0\u1680\u2000-\u200a\u202f\u205f\u3000"
EMAIL_PATTERN = rf"^[{_BLANK}]*(?:{SAFE_EMAIL})[{_BLANK}]*$"
"""`tags.EMAIL`, header-safe, with white space around it (taken off)."""
PHONE_PATTERN = r"^[\t ]*\+?[0-9(][0-9 ().-]{0,40}$"
"""A phone number's loose shape; whether it is a number in the tenant's region is the
handler's question (`to_e164`), answered `unsendable`."""

PATTERN_MESSAGES: dict[str, Message] = {
    EMAIL_PATTERN: lambda value: tags.header_problem(value) or "must be an email address",
    PHONE_PATTERN: "must be a phone number, e.g. +14155550100 or (415) 555-0100",
}

ZONES = tuple(sorted(zoneinfo.available_timezones()))
"""The IANA zone names this host's tz database knows (`Europe/Berlin`, `UTC`)."""
_ZONE_SET = frozenset(ZONES)


def _zone(value: str) -> str:
    if value not in _ZONE_SET:
        raise PydanticCustomError("time_zone", "must be an IANA time zone such as Europe/Berlin")
    return value


Email = Annotated[
    str, Field(max_length=EMAIL_MAX_LENGTH, pattern=EMAIL_PATTERN), AfterValidator(str.strip)
]
Phone = Annotated[
    str,
    Field(
        max_length=64,
        pattern=PHONE_PATTERN,
        description="Read in the tenant's region, stored in E.164 (a number that is not one "
        "there: 422 unsendable).",
    ),
    AfterValidator(str.strip),
]
TimeZone = Annotated[
    str,
    AfterValidator(_zone),
    WithJsonSchema({"type": "string", "enum": list(ZONES), "description": "An IANA time zone."}),
]
ContactLocale = Annotated[Locale, AfterValidator(tags.normalize_locale)]
"""A language tag, kept in one spelling (`pt_br` → `pt-BR`)."""
Name = Annotated[str, text(VALUE_MAX_LENGTH, header=True), AfterValidator(str.strip)]


class Contact(BaseModel):
    """How to reach a person and how to write to them; every field optional."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    phone: Phone | None = None
    timezone: TimeZone | None = None
    locale: ContactLocale | None = None
    name: Name | None = None


class EventRecipient(Contact):
    """One person an ingested event concerns: a contact and the user's id; at least one of
    `user_id`, `email` and `phone` (checked once the fields are, and named on the recipient)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,  # a DomainEvent's part
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"type": "string"}}}
                for name in ("user_id", "email", "phone")
            ]
        },
    )

    user_id: str | None = None

    def address(self, channel: str) -> str | None:
        """Where this recipient gets a notification on `channel`, if anywhere."""
        return {"email": self.email, "sms": self.phone, "in_app": self.user_id}.get(channel)

    @model_validator(mode="after")
    def _reaches_someone(self) -> EventRecipient:
        if self.user_id is None and self.email is None and self.phone is None:
            raise PydanticCustomError("recipient", "needs a user_id, an email or a phone")
        return self


def event_recipient_model(id_max_length: int, id_pattern: str) -> type[EventRecipient]:
    """`EventRecipient` with the id rule."""
    user_id = Annotated[str, opaque_id(id_max_length, id_pattern)] | None
    return bounded(EventRecipient, user_id=(user_id, None))
