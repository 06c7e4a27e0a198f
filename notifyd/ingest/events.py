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
from notifyd.schemas.contacts import EventRecipient
from notifyd.schemas.errors import FieldError, Invalid
from notifyd.schemas.events import Event, event_reader
from notifyd.schemas.reader import Reader
from notifyd.settings import Settings

Recipient = EventRecipient
"""One person the event concerns (at least one of `user_id`, `email`, `phone` is set)."""


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
    """Bounds of one event; each is a setting (an event is bounded like a request body: the
    same payloads arrive both ways)."""

    max_bytes: int
    max_recipients: int
    context_max_keys: int
    id_rule: OpaqueIdRule

    @classmethod
    def from_settings(cls, s: Settings) -> EventLimits:
        rule = OpaqueIdRule.from_settings(s.id_max_length, s.id_pattern)
        return cls(s.max_body_bytes, s.event_max_recipients, s.context_max_keys, rule)

    def reader(self) -> Reader[Event]:
        """The event model's reader with these bounds (made once per set of bounds)."""
        rule = self.id_rule
        return event_reader(
            self.max_recipients, self.context_max_keys, rule.max_length, rule.pattern.pattern
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
    try:
        event = limits.reader().python(data)
    except Invalid as exc:
        raise MalformedEvent(exc.errors) from None
    return DomainEvent(
        event_id=event.event_id,
        tenant_id=event.tenant_id,
        type=event.type,
        recipients=tuple(event.recipients),
        template_key=event.template_key,
        context=event.context or {},
        channels=None if event.channels is None else tuple(dict.fromkeys(event.channels)),
        category=event.category,
        critical=event.critical,
    )
