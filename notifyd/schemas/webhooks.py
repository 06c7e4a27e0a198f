"""Webhook endpoints (issue 29): the create and PATCH bodies, and the answers.

The URL's shape is checked here (an http(s) URL without user info or fragment, of bounded
length); whether notifyd may connect to it (https unless the operator allows http, the egress
policy on its host and port) depends on settings and DNS, and is the handler's `unsendable`
422 naming `url`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from notifyd.schemas.fields import Flag, text

URL_MAX_LENGTH = 2048
DESCRIPTION_MAX_LENGTH = 500

URL_PATTERN = (
    r"^https?://(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:[/?][!-\"$-~]*)?$"
)
"""http(s)://host[:port][/path][?query]: a name or IP literal, no user info, no fragment,
printable ASCII only (a receiver's URL is percent-encoded already)."""

PATTERN_MESSAGES = {
    URL_PATTERN: "must be an http:// or https:// URL without user info or fragment",
}

EventType = Literal[
    "notification.queued",
    "notification.sent",
    "notification.delivered",
    "notification.failed",
    "notification.bounced",
    "notification.complained",
    "notification.suppressed",
    "notification.read",
    "message.created",
    "reminder.fired",
    "workflow.step",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
"""The catalogue an endpoint subscribes from (issue 29). `notification.bounced` and
`notification.complained` are accepted now and come once bounce and complaint handling
exists; the triggers of notifyd/sql/0013_webhooks.sql make every other one."""

Url = Annotated[
    str,
    Field(
        min_length=1,
        max_length=URL_MAX_LENGTH,
        pattern=URL_PATTERN,
        description="Where events are POSTed: https:// (http:// only where the operator allows "
        "it), a host the egress policy allows",
    ),
]
Events = Annotated[
    list[EventType],
    Field(min_length=1, max_length=len(EVENT_TYPES), description="The event types sent here"),
]
Description = Annotated[str, text(DESCRIPTION_MAX_LENGTH)]


class WebhookEndpointCreate(BaseModel):
    """A new endpoint; its secret is made by notifyd and shown once, in the answer."""

    model_config = ConfigDict(extra="forbid")

    url: Url
    events: Events
    description: Description | None = None


class WebhookEndpointPatch(BaseModel):
    """What changes of an endpoint (a field left out stays as it is); `enabled: true` turns a
    disabled endpoint back on."""

    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    events: Events | None = None
    description: Description | None = None
    enabled: Flag | None = None


class WebhookEndpoint(BaseModel):
    """An endpoint as stored (its secret never shown again)."""

    id: uuid.UUID
    url: str
    events: list[EventType]
    description: str
    enabled: bool
    disabled_reason: str | None
    created_at: datetime
    updated_at: datetime


class WebhookEndpointWithSecret(WebhookEndpoint):
    """An endpoint just created, or whose secret was just rotated: the secret, once."""

    secret: str = Field(description="whsec_<base64>: the key of every request's signature")


class WebhookAttempt(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None


class WebhookDelivery(BaseModel):
    """One event for one endpoint; `id` is its `webhook-id`, the same on every attempt."""

    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: EventType
    occurred_at: datetime
    data: dict[str, object]
    status: Literal["pending", "sending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: datetime | None
    done_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_latency_ms: int | None
    attempt_log: list[WebhookAttempt]
