"""Provider callbacks: Twilio's message status report (`POST /webhooks/twilio/status`).

Twilio posts a form (`application/x-www-form-urlencoded`) to the URL notifyd gave it, whose
query names the tenant and the notification. The form carries more fields than notifyd reads
(`AccountSid`, `To`, `SmsStatus`, ...): they are allowed, and signed like the rest.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from notifyd.schemas.fields import bounded, opaque_id
from notifyd.settings import Settings

FIELD_MAX_LENGTH = 256
"""Characters of a form field notifyd reads (an error's code and message are cut there)."""

_Value = Annotated[str, Field(min_length=1, max_length=FIELD_MAX_LENGTH)]


class TwilioStatusQuery(BaseModel):
    """The callback URL's query, as the SMS provider built it (covered by the signature)."""

    tenant: str = Field(description="The tenant whose Twilio account sent the message.")
    notification: uuid.UUID = Field(description="The notification the message delivers.")


def status_query_model(settings: Settings) -> type[TwilioStatusQuery]:
    """`TwilioStatusQuery` with the id rule."""
    tenant = Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)]
    return bounded(
        TwilioStatusQuery,
        tenant=(tenant, Field(description="The tenant whose Twilio account sent the message.")),
    )


class TwilioStatus(BaseModel):
    """A message status callback: the fields notifyd reads. Checked once the
    `X-Twilio-Signature` is (nothing is read before): a fault answers 400."""

    model_config = ConfigDict(extra="allow")

    MessageSid: _Value
    MessageStatus: _Value = Field(description="delivered, undelivered and failed change the row.")
    ErrorCode: str | None = Field(None, description="Kept up to 256 characters.")
    ErrorMessage: str | None = Field(None, description="Kept up to 256 characters.")
    OptOutType: str | None = Field(
        None, description="STOP: the recipient opted out; the number is suppressed."
    )
