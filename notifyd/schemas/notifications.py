"""Notifications: the send order (REST body, `notifyd send`), its rules across fields, and the
mark-as-read body.

`NotificationSend` declares the fields and the bounds that are not settings; `send_model`
makes, at start-up, the subclass that also carries the bounds that are (subject and message
lengths, context keys, the id rule). `send_problems` holds the rules no single field can say
(message or template, recipient by channel), over values already of the right type, and
`send_rules_schema` says the same rules in JSON Schema for the document, built from the same
patterns.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from notifyd import tags
from notifyd.ids import OpaqueIdRule
from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import (
    SPACES,
    Category,
    Channel,
    Flag,
    Locale,
    PageQuery,
    TemplateKey,
    anchored,
    bounded,
    id_list,
    optional_id,
    text,
)
from notifyd.settings import Settings

RECIPIENT_MAX_LENGTH = 320

# The loose shape of a phone number; whether it is one (E.164 in the tenant's region) is
# `accept.prepare`'s question, answered with a 422 of its own ("unsendable").
PHONE = re.compile(r"\+?[0-9][0-9 ().-]{4,30}")


class NotificationSend(BaseModel):
    """One notification to send. Field names are the seeds' (`notification_type`, `message`)."""

    model_config = ConfigDict(extra="forbid")

    notification_type: Channel
    recipient: Annotated[
        str,
        text(
            RECIPIENT_MAX_LENGTH,
            "Email address (email), phone number (sms) or user id (in_app).",
            header=True,
        ),
    ]
    subject: str | None = None
    message: str | None = Field(None, description="Required unless template_key is given.")
    template_key: TemplateKey | None = Field(None, description="Render this stored template.")
    context: dict[str, Any] | None = Field(None, description="The template's values.")
    user_id: str | None = Field(None, description="For email/sms: show it in this user's center.")
    category: Category | None = Field(None, description="Matched by the user's preferences.")
    critical: Flag | None = Field(None, description="Ignores preferences (service and admin).")
    locale: Locale | None = Field(None, description="The template's locale (else the tenant's).")


def send_model(settings: Settings) -> type[NotificationSend]:
    """`NotificationSend` with the bounds that are settings, made once at start-up; its JSON
    Schema also carries the rules across fields (`send_rules_schema`)."""
    model = bounded(
        NotificationSend,
        subject=(Annotated[str, text(settings.subject_max_length, header=True)] | None, None),
        message=(
            Annotated[str, text(settings.notification_max_length)] | None,
            Field(None, description="Required unless template_key is given."),
        ),
        context=(
            Annotated[dict[str, Any], Field(max_length=settings.context_max_keys)] | None,
            Field(None, description="The template's values (template_key only)."),
        ),
        user_id=optional_id(settings, description="For email/sms: show it in this user's center."),
    )
    # create_model takes no config beside a base: the subclass's own config dict, read when
    # the document is generated
    model.model_config["json_schema_extra"] = send_rules_schema(settings)
    return model


def _present(name: str, kind: str) -> dict[str, Any]:
    return {"required": [name], "properties": {name: {"type": kind}}}


def _when_channel(channel: str, then: dict[str, Any]) -> dict[str, Any]:
    return {"if": {"properties": {"notification_type": {"const": channel}}}, "then": then}


def send_rules_schema(settings: Settings) -> dict[str, Any]:
    """`send_problems` in JSON Schema: what the document says about the fields together."""
    around = SPACES  # a recipient is read without the white space around it
    return {
        "allOf": [
            {"anyOf": [_present("message", "string"), _present("template_key", "string")]},
            {"if": _present("context", "object"), "then": _present("template_key", "string")},
            _when_channel(
                "email",
                {
                    "properties": {
                        "recipient": {"pattern": f"^{around}(?:{tags.EMAIL.pattern}){around}$"}
                    }
                },
            ),
            _when_channel(
                "sms",
                {
                    "properties": {
                        "recipient": {"pattern": f"^{around}(?:{PHONE.pattern}){around}$"}
                    }
                },
            ),
            _when_channel(
                "in_app",
                {
                    "properties": {
                        "recipient": {
                            "pattern": anchored(settings.id_pattern),
                            "maxLength": settings.id_max_length,
                        },
                        "user_id": {"type": "null"},
                    }
                },
            ),
        ]
    }


def send_problems(
    values: Mapping[str, Any], id_rule: OpaqueIdRule, at_fault: Collection[str] = ()
) -> list[FieldError]:
    """The rules across a send's fields, over `values` of the right type (a field absent or in
    `at_fault` is skipped: it has its error already, and gets no second one). On the hot path:
    plain lookups, no error list until there is an error."""
    if at_fault:
        values = {k: v for k, v in values.items() if k not in at_fault}
    get = values.get
    channel, recipient = get("notification_type"), get("recipient")
    found: list[FieldError] = []
    if get("template_key") is None:
        if get("message") is None:
            found.append(FieldError("message", "is required unless template_key is given"))
        if get("context") is not None:
            found.append(FieldError("context", "is only used with template_key"))
    if recipient is not None and channel is not None:
        problem = _recipient_problem(channel, recipient, id_rule)
        if problem is not None:
            found.append(FieldError("recipient", problem))
    if channel == "in_app" and get("user_id") is not None:
        found.append(FieldError("user_id", "is implied by recipient for notification_type in_app"))
    if found and at_fault:
        return [e for e in found if e.field not in at_fault]
    return found


def _recipient_problem(channel: str, recipient: str, id_rule: OpaqueIdRule) -> str | None:
    """An address read without the white space around it; a user id as it is."""
    if channel == "email":
        if not tags.is_email(recipient.strip()):
            return "must be an email address for notification_type email"
    elif channel == "sms":
        if not PHONE.fullmatch(recipient.strip()):
            return "must be a phone number for notification_type sms"
    else:
        problem = id_rule.problem(recipient)
        if problem is not None:
            return f"must be a user id for notification_type in_app: {problem}"
    return None


Status = Literal[
    "queued",
    "dispatched",
    "sending",
    "retrying",
    "sent",
    "delivered",
    "failed",
    "undelivered",
    "suppressed",
    "cancelled",
    "bounced",
]
"""A notification's delivery state (the `notifications.status` CHECK in sql/)."""


class NotificationAccepted(BaseModel):
    """The 202 of a send: the id to poll (also in Location)."""

    notification_id: uuid.UUID
    status: Literal["queued"]


class Notification(BaseModel):
    """One notification with its delivery state (field names as in the first API:
    `notification_type`, `message`, `is_sent`)."""

    # documents the answer of `http.notifications.notification_json` (a test keeps the two
    # equal); answers are not validated on the way out

    id: uuid.UUID
    tenant_id: str
    notification_type: Channel
    recipient: str
    user_id: str | None
    created_by: str
    subject: str | None
    message: str | None
    html: str | None
    template_key: str | None
    context: dict[str, Any] | None
    locale: str | None
    category: str | None
    critical: bool
    status: Status
    is_sent: bool
    is_read: bool
    read_at: datetime | None
    attempts: int
    last_error: str | None
    provider_message_id: str | None
    provider_status: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None


class MarkRead(BaseModel):
    """Mark the caller's notifications read: these `ids`, or `all`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # `mark_read_problems`, for the document
            "anyOf": [
                {
                    "required": ["ids"],
                    "properties": {"ids": {"type": "array"}, "all": {"enum": [False, None]}},
                },
                {
                    "required": ["all"],
                    "properties": {"all": {"const": True}, "ids": {"type": "null"}},
                },
            ]
        },
    )

    ids: list[uuid.UUID] | None = None
    all: Flag | None = None


def mark_read_model(settings: Settings) -> type[MarkRead]:
    """`MarkRead` with `settings.mark_read_max_ids`."""
    return bounded(MarkRead, ids=id_list(settings))


def mark_read_problems(
    values: Mapping[str, Any], at_fault: Collection[str] = ()
) -> list[FieldError]:
    """Exactly one of `ids` and `all: true`."""
    everything = values.get("all")
    if "ids" in at_fault:
        return []
    if values.get("ids") is None and not everything:
        return [FieldError("ids", 'send "ids": [...] or "all": true')]
    if values.get("ids") is not None and everything:
        return [FieldError("all", 'send either "ids" or "all", not both')]
    return []


class NotificationsMarkedRead(BaseModel):
    """How many were marked, and how many stay unread."""

    updated: int
    unread_count: int


class NotificationQuery(PageQuery):
    """A page of the caller's notifications, newest first."""

    unread: bool = False
    type: Channel | None = None
