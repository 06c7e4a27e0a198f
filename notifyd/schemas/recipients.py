"""Recipients (issue 27): the PUT body a service or admin stores, the PATCH a user makes of
their own time zone and locale, and the answer.

Validated as the reminders' contacts are: single-line values (they may reach a mail header),
an email address, an IANA time zone, a language tag. The phone is read in the tenant's region
by the handler (`providers.phones.to_e164`), which is not known here.
"""

from __future__ import annotations

import functools
import zoneinfo
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from notifyd import tags
from notifyd.schemas.fields import Locale, text

VALUE_MAX_LENGTH = 320
"""Characters in one stored value (an email address is at most 254)."""


@functools.cache
def zone_names() -> frozenset[str]:
    """Every IANA zone name this host's tz database knows."""
    return frozenset(zoneinfo.available_timezones())


def is_time_zone(name: str) -> bool:
    """An IANA zone name this host's tz database knows (`Europe/Berlin`, `UTC`)."""
    return name in zone_names()


def _email(value: str) -> str:
    value = value.strip()
    if not tags.is_email(value):
        raise PydanticCustomError("email", "must be an email address")
    return value


def _zone(value: str) -> str:
    if not is_time_zone(value):
        raise PydanticCustomError("time_zone", "must be an IANA time zone such as Europe/Berlin")
    return value


_Value = Annotated[str, text(VALUE_MAX_LENGTH, header=True)]
Email = Annotated[_Value, AfterValidator(_email)]
Phone = Annotated[_Value, Field(description="Read in the tenant's region; stored in E.164.")]
TimeZone = Annotated[_Value, AfterValidator(_zone), Field(description="An IANA time zone.")]


class RecipientPut(BaseModel):
    """A recipient's addresses and preferences for rendering; a PUT replaces the whole
    recipient (a value left out is cleared)."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    phone: Phone | None = None
    timezone: TimeZone | None = None
    locale: Locale | None = None
    name: _Value | None = None


class RecipientOwnPatch(BaseModel):
    """What a user may change of their own recipient: time zone and locale (null clears)."""

    model_config = ConfigDict(extra="forbid")

    timezone: TimeZone | None = None
    locale: Locale | None = None


class Recipient(BaseModel):
    """A stored recipient (the answer of every recipients route)."""

    user_id: str
    email: str | None
    phone: str | None
    timezone: str | None
    locale: str | None
    name: str | None
    created_at: datetime
    updated_at: datetime
