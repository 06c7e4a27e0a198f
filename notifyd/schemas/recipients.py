"""Recipients (issue 27): the PUT body a service or admin stores, the PATCH a user makes of
their own time zone and locale, and the answer.

Their values follow the contact rule (`schemas.contacts`), as the reminders' contacts and an
event's recipients do. The phone is read in the tenant's region by the handler
(`providers.phones.to_e164`), which is not known here.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from notifyd.schemas.contacts import Contact, ContactLocale, TimeZone


class RecipientPut(Contact):
    """A recipient's addresses and preferences for rendering; a PUT replaces the whole
    recipient (a value left out is cleared)."""


class RecipientOwnPatch(BaseModel):
    """What a user may change of their own recipient: time zone and locale (null clears)."""

    model_config = ConfigDict(extra="forbid")

    timezone: TimeZone | None = None
    locale: ContactLocale | None = None


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
