"""Interview reminders: the create and reschedule bodies, and the list query.

A reminder's contacts follow the contact rule (`schemas.contacts`). The times are RFC 3339
with an offset. Two rules need more than the body's shape: the interview must be ahead of
now, and the reminder before the interview. The document cannot say either: a body that
breaks only them is answered 422 `unsendable` (the reader's `refusals`, `create_refusals`); a
body with other faults gets them in the same 422 as the rest. On a reschedule the stored
time stands for the one left out, so the handler checks them (`time_problems`).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from notifyd.schemas.contacts import Contact
from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import (
    Channel,
    PageQuery,
    bounded,
    opaque_id,
    parse_rfc3339,
)
from notifyd.settings import CHANNELS, Settings

ReminderStatus = Literal["scheduled", "fired", "skipped", "cancelled"]
"""A reminder's state (the `interview_reminders.status` CHECK in sql/)."""
STATUSES = get_args(ReminderStatus)

_TIME_MESSAGE = "must be an RFC 3339 time with an offset, e.g. 2026-03-10T10:00:00Z"


def _timestamp(value: Any) -> datetime:
    parsed = parse_rfc3339(value) if isinstance(value, str) else None
    if parsed is None:
        # `_type`: a null reads "is required", as every other field's (errors.message)
        raise PydanticCustomError("datetime_type", _TIME_MESSAGE)
    return parsed


Timestamp = Annotated[
    datetime,
    PlainValidator(_timestamp),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
"""An RFC 3339 time with an explicit offset."""


def _channels(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The list's fault named on the list (`channels`), as clients have always read it."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("channels", f"must be a list of: {', '.join(CHANNELS)}") from None


Channels = Annotated[list[Channel], WrapValidator(_channels)]


class ReminderCreate(BaseModel):
    """An interview reminder to schedule (service or admin)."""

    model_config = ConfigDict(extra="forbid")

    application_id: str
    candidate_id: str
    employer_id: str
    interview_time: Timestamp = Field(description="RFC 3339 with an offset; ahead of now.")
    reminder_time: Timestamp = Field(description="Before interview_time.")
    candidate_contact: Contact | None = None
    employer_contact: Contact | None = None
    channels: Channels | None = Field(
        None, description="Default: every channel a contact allows; in_app always."
    )


def create_model(settings: Settings) -> type[ReminderCreate]:
    """`ReminderCreate` with the id rule."""
    one = Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)]
    return bounded(
        ReminderCreate, application_id=(one, ...), candidate_id=(one, ...), employer_id=(one, ...)
    )


class ReminderPatch(BaseModel):
    """A reschedule: a new reminder time, interview time, or both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # `patch_problems`, for the document
            "anyOf": [
                {"required": [name], "properties": {name: {"type": "string"}}}
                for name in ("reminder_time", "interview_time")
            ]
        },
    )

    interview_time: Timestamp | None = None
    reminder_time: Timestamp | None = None


def time_problems(
    interview: datetime | None, reminder: datetime | None, now: datetime | None = None
) -> list[FieldError]:
    """The interview ahead of `now`, the reminder before the interview."""
    found = []
    if interview is not None and interview <= (now or datetime.now(UTC)):
        found.append(FieldError("interview_time", "is in the past"))
    if interview is not None and reminder is not None and reminder >= interview:
        found.append(FieldError("reminder_time", "must be before interview_time"))
    return found


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    return parse_rfc3339(value) if isinstance(value, str) else None


def create_refusals(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    """`time_problems` of a create body (raw values when some field failed)."""
    found = time_problems(_time(values.get("interview_time")), _time(values.get("reminder_time")))
    return [f for f in found if f.field not in at_fault]


def patch_problems(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    """A reschedule changes at least one time."""
    if at_fault or values.get("interview_time") is not None:
        return []
    if values.get("reminder_time") is not None:
        return []
    return [FieldError("reminder_time", "send reminder_time and/or interview_time")]


class ReminderQuery(PageQuery):
    """A page of the reminders the caller may see, newest first."""

    status: ReminderStatus | None = None
    application_id: str | None = None


class Reminder(BaseModel):
    """A reminder as every reminders route answers it (`http.reminders.reminder_json`)."""

    id: uuid.UUID
    reminder_id: uuid.UUID | None = Field(None, description="The create's answer only: id again.")
    application_id: str
    candidate_id: str = Field(description="Sees the reminder; reminded in-app, by contact.")
    employer_id: str = Field(description="Sees, reschedules and cancels it; reminded too.")
    created_by: str = Field(description="The service or admin that scheduled it.")
    interview_time: datetime
    reminder_time: datetime = Field(description="When the reminders are sent.")
    status: ReminderStatus
    is_sent: bool = Field(description="status is fired (the first API's field).")
    fired_at: datetime | None
    late: bool = Field(description="Fired later than the lateness bound (a metric too).")
    lateness_ms: int | None = Field(description="How late it fired, once fired.")
    candidate_contact: dict[str, str] | None = Field(description="As stored: phone in E.164.")
    employer_contact: dict[str, str] | None = Field(description="As stored: phone in E.164.")
    channels: list[Channel] | None = Field(description="null: every channel a contact allows.")
    notification_ids: list[uuid.UUID] = Field(description="What firing made.")
    created_at: datetime
    updated_at: datetime
