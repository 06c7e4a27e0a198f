"""A domain event as the pipeline takes it, whichever source carried it: decoded, bounded
and checked by its model (`schemas.events.Event`), then turned into a `DomainEvent`.

Other services publish JSON objects such as

    {"event_id": "evt-81", "tenant_id": "TEN-0001", "type": "interview.scheduled",
     "template_key": "interview_scheduled", "context": {"Position": "Backend engineer"},
     "recipients": [{"user_id": "cand-7", "email": "jo@example.com", "locale": "pt-BR"}],
     "channels": ["email", "in_app"]}

to the Redis stream or the RabbitMQ queue; both parse them here, so an event is accepted or
refused the same way whichever way it came. A refusal names every field at fault
(`recipients[1].email: must be an email address`), because the reason a dead letter carries is
all the publisher gets to fix its event with.

Recipients use the REST API's words: an `email` address gets an email, a `phone` an SMS and a
`user_id` an in-app notification (and, on the email and SMS, names whose notification center
and preferences they belong to), as `POST /notifications/send/` names them. `locale`,
`timezone` and `name` are the reminder contacts' fields, checked by the same rule
(`schemas.contacts`).

Events are strict like REST bodies: an unknown field is an error, because a misspelt optional
one (`chanels`) silently ignored would send on channels the publisher meant to leave out.
Values are never echoed in a reason: they may be personal data, and reasons reach logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from notifyd.ids import OpaqueIdRule
from notifyd.payloads import loads
from notifyd.schemas.errors import FieldError, Invalid
from notifyd.schemas.events import event_reader
from notifyd.settings import Settings


@dataclass(frozen=True, slots=True)
class Recipient:
    """One person the event concerns; at least one of `user_id`, `email`, `phone` is set."""

    user_id: str | None = None
    email: str | None = None
    phone: str | None = None
    locale: str | None = None
    timezone: str | None = None
    name: str | None = None

    def address(self, channel: str) -> str | None:
        """Where this recipient gets a notification on `channel`, if anywhere."""
        return {"email": self.email, "sms": self.phone, "in_app": self.user_id}.get(channel)


@dataclass(frozen=True, slots=True)
class DomainEvent:
    event_id: str
    tenant_id: str
    type: str
    recipients: tuple[Recipient, ...]
    template_key: str
    context: dict[str, Any]
    # None: every channel a recipient has an address for and the tenant has a template for
    channels: tuple[str, ...] | None = None
    category: str | None = None  # None: the event's type
    critical: bool = False


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Bounds of one event; each is a setting."""

    max_bytes: int
    max_recipients: int
    context_max_keys: int
    id_rule: OpaqueIdRule

    @classmethod
    def from_settings(cls, settings: Settings) -> EventLimits:
        return cls(
            # an event is bounded like a request body: the same payloads arrive both ways
            max_bytes=settings.max_body_bytes,
            max_recipients=settings.event_max_recipients,
            context_max_keys=settings.context_max_keys,
            id_rule=OpaqueIdRule.from_settings(settings.id_max_length, settings.id_pattern),
        )


class MalformedEvent(ValueError):
    """The event can never be accepted as it is: it goes to the dead-letter stream."""

    def __init__(self, problems: list[FieldError]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


def parse_event(raw: bytes | str, limits: EventLimits) -> DomainEvent:
    """The event in `raw` (JSON text), or `MalformedEvent` naming everything wrong with it."""
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > limits.max_bytes:
        raise MalformedEvent(
            [FieldError("event", f"is {len(data)} bytes; at most {limits.max_bytes} are accepted")]
        )
    try:
        value = loads(data)
    except ValueError as exc:  # orjson's JSONDecodeError is one
        raise MalformedEvent([FieldError("event", f"is not valid JSON: {exc}")]) from None
    if not isinstance(value, dict):
        raise MalformedEvent([FieldError("event", "must be a JSON object")])
    return decode_event(value, limits)


def decode_event(data: Mapping[str, Any], limits: EventLimits) -> DomainEvent:
    """The event in `data` (`schemas.events.Event`), or `MalformedEvent` naming every field at
    fault."""
    reader = event_reader(
        limits.max_recipients,
        limits.context_max_keys,
        limits.id_rule.max_length,
        limits.id_rule.pattern.pattern,
    )
    try:
        event = reader.python(data)
    except Invalid as exc:
        raise MalformedEvent(exc.errors) from None
    return DomainEvent(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        type=event.type,
        recipients=tuple(Recipient(**r.model_dump(exclude_none=True)) for r in event.recipients),
        template_key=event.template_key,
        context=event.context or {},
        channels=None if event.channels is None else tuple(dict.fromkeys(event.channels)),
        category=event.category,
        critical=event.critical,
    )
