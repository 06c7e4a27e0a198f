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

An event may name a `workflow` instead (`{"event_id", "tenant_id", "type", "workflow":
"interview", "recipients": ["cand-7"], "data": {…}, "send_at"?, "cancel_key"?,
"critical"?}`): its own four fields are read by `schemas.events.WorkflowEventHead`, its trigger
fields are the body of `POST /workflows/{workflow}/trigger/`, read by the same model with the
same rules and bounds (`Schemas.workflow_trigger`), so a trigger is refused for the same
reasons, naming the same fields, whichever way it came.

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
from notifyd.schemas.events import (
    WORKFLOW_EVENT_FIELDS,
    Event,
    WorkflowEventHead,
    event_reader,
    workflow_event_reader,
)
from notifyd.schemas.reader import Reader
from notifyd.schemas.registry import Schemas
from notifyd.schemas.workflows import WorkflowTrigger
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
class WorkflowEvent:
    """An event that triggers the tenant's workflow `workflow_key` (`trigger`: the body
    `POST /workflows/{workflow_key}/trigger/` takes, already checked)."""

    event_id: str
    tenant_id: str
    type: str
    workflow_key: str
    trigger: WorkflowTrigger

    @property
    def critical(self) -> bool:
        return self.trigger.critical


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Bounds of one event; each is a setting (an event is bounded like a request body: the
    same payloads arrive both ways)."""

    max_bytes: int
    max_recipients: int
    context_max_keys: int
    id_rule: OpaqueIdRule
    # the trigger API's model and rules (None: this reader takes no workflow events)
    trigger: Reader[WorkflowTrigger] | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> EventLimits:
        rule = OpaqueIdRule.from_settings(s.id_max_length, s.id_pattern)
        trigger = Schemas.build(s).workflow_trigger
        return cls(s.max_body_bytes, s.event_max_recipients, s.context_max_keys, rule, trigger)

    def reader(self) -> Reader[Event]:
        """The event model's reader with these bounds (made once per set of bounds)."""
        rule = self.id_rule
        return event_reader(
            self.max_recipients, self.context_max_keys, rule.max_length, rule.pattern.pattern
        )

    def workflow_reader(self) -> Reader[WorkflowEventHead]:
        """The reader of a workflow event's own fields, with the id rule's bounds."""
        return workflow_event_reader(self.id_rule.max_length, self.id_rule.pattern.pattern)


class MalformedEvent(ValueError):
    """The event can never be accepted as it is: it goes to the dead-letter stream."""

    def __init__(self, problems: list[FieldError]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


def parse_event(raw: bytes | str, limits: EventLimits) -> DomainEvent | WorkflowEvent:
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
    if "workflow" in value:
        return decode_workflow_event(value, limits)
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


def decode_workflow_event(data: Mapping[str, Any], limits: EventLimits) -> WorkflowEvent:
    """An event naming a `workflow`: its own fields through `WorkflowEventHead`, the trigger's
    through the trigger API's reader (`limits.trigger`), every problem named at once."""
    problems: list[FieldError] = []
    head = None
    try:
        head = limits.workflow_reader().python(
            {k: v for k, v in data.items() if k in WORKFLOW_EVENT_FIELDS}
        )
    except Invalid as exc:
        problems += exc.errors
    trigger_fields = WorkflowTrigger.model_fields
    for name in data:
        if name not in WORKFLOW_EVENT_FIELDS and name not in trigger_fields:
            problems.append(
                FieldError(str(name), "is not a known field of an event naming a workflow")
            )
    trigger = None
    if limits.trigger is None:
        problems.append(FieldError("workflow", "this source takes no events naming a workflow"))
    else:
        try:
            trigger = limits.trigger.python({k: data[k] for k in trigger_fields if k in data})
        except Invalid as exc:  # a refusal too: an event has no "unsendable" of its own
            problems += exc.errors
    if problems:
        raise MalformedEvent(problems)
    assert head is not None and trigger is not None
    return WorkflowEvent(head.event_id, head.tenant_id, head.type, head.workflow, trigger)
