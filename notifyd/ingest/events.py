"""The one schema of a domain event, whichever source carried it.

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

from notifyd import tags
from notifyd.ids import OpaqueIdRule
from notifyd.payloads import loads
from notifyd.schemas.contacts import event_recipient_reader
from notifyd.schemas.errors import FieldError, Invalid
from notifyd.settings import CHANNELS, Settings

FIELDS = (
    "event_id",
    "tenant_id",
    "type",
    "recipients",
    "template_key",
    "context",
    "channels",
    "category",
    "critical",
)


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
    reader = _Reader(limits.id_rule)
    event_id = reader.opaque_id(data, "event_id")
    tenant_id = reader.opaque_id(data, "tenant_id")
    event_type = reader.name(data, "type", tags.CATEGORY, "1-64 letters, digits and _ . : -")
    template_key = reader.name(
        data, "template_key", tags.TEMPLATE_KEY, "1-128 letters, digits and _ . : -"
    )
    category = reader.name(
        data, "category", tags.CATEGORY, "1-64 letters, digits and _ . : -", required=False
    )
    context = _context(reader, data.get("context"), limits.context_max_keys)
    channels = _channels(reader, data.get("channels"))
    critical = data.get("critical", False)
    if not isinstance(critical, bool):
        reader.error("critical", "must be true or false")
        critical = False
    recipients = _recipients(reader, data.get("recipients"), limits)
    for name in data:
        if name not in FIELDS:
            reader.error(str(name), "is not a known field")
    if reader.problems:
        raise MalformedEvent(reader.problems)
    assert event_id is not None and tenant_id is not None
    assert event_type is not None and template_key is not None
    return DomainEvent(
        event_id=event_id,
        tenant_id=tenant_id,
        type=event_type,
        recipients=tuple(recipients),
        template_key=template_key,
        context=context,
        channels=channels,
        category=category,
        critical=critical,
    )


class _Reader:
    """Collects every problem, so one dead letter tells the publisher all there is to fix."""

    def __init__(self, id_rule: OpaqueIdRule) -> None:
        self.id_rule = id_rule
        self.problems: list[FieldError] = []

    def error(self, field: str, message: str) -> None:
        self.problems.append(FieldError(field, message))

    def opaque_id(self, data: Mapping[str, Any], field: str, where: str = "") -> str | None:
        value = data.get(field)
        if value is None:
            self.error(where + field, "is required")
            return None
        problem = self.id_rule.problem(value)
        if problem is not None:
            self.error(where + field, problem)
            return None
        assert isinstance(value, str)
        return value

    def name(
        self,
        data: Mapping[str, Any],
        field: str,
        shape: Any,
        described: str,
        *,
        required: bool = True,
    ) -> str | None:
        value = data.get(field)
        if value is None:
            if required:
                self.error(field, "is required")
            return None
        if not isinstance(value, str) or not shape.fullmatch(value):
            self.error(field, f"must be {described}")
            return None
        return value


def _context(reader: _Reader, value: Any, max_keys: int) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        reader.error("context", "must be a JSON object")
        return {}
    if len(value) > max_keys:
        reader.error("context", f"must have at most {max_keys} keys")
        return {}
    return value


def _channels(reader: _Reader, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        reader.error("channels", f"must be a non-empty list of: {', '.join(CHANNELS)}")
        return None
    unknown = [item for item in value if item not in CHANNELS]
    if unknown:
        shown = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 32 else "…"
        reader.error("channels", f"unknown channel {shown!r}; choose from: {', '.join(CHANNELS)}")
        return None
    return tuple(dict.fromkeys(value))


def _recipients(reader: _Reader, value: Any, limits: EventLimits) -> list[Recipient]:
    if value is None:
        reader.error("recipients", "is required")
        return []
    if not isinstance(value, list) or not value:
        reader.error("recipients", "must be a non-empty list of objects")
        return []
    if len(value) > limits.max_recipients:
        reader.error("recipients", f"must have at most {limits.max_recipients} entries")
        return []
    return [
        recipient
        for index, item in enumerate(value)
        if (recipient := _recipient(reader, item, f"recipients[{index}]")) is not None
    ]


def _recipient(reader: _Reader, item: Any, where: str) -> Recipient | None:
    """One recipient, by the contact rule (`schemas.contacts`) and the id rule."""
    if not isinstance(item, dict):
        reader.error(where, "must be a JSON object")
        return None
    rule = reader.id_rule
    try:
        found = event_recipient_reader(rule.max_length, rule.pattern.pattern).python(item)
    except Invalid as exc:
        for error in exc.errors:
            reader.error(f"{where}.{error.field}" if error.field else where, error.message)
        return None
    return Recipient(**found.model_dump(exclude_none=True))
