"""An ingested domain event: the one schema of what other services publish, whichever source
(Redis stream, RabbitMQ, Kafka) carried it.

Its recipients follow the contact rule (`schemas.contacts.EventRecipient`); its bounds are
settings (`NOTIFYD_EVENT_MAX_RECIPIENTS`, `NOTIFYD_CONTEXT_MAX_KEYS`, the id rule). A refusal
is the dead letter's reason, all the publisher gets to fix its event with: it names every
field at fault and never echoes a value (values may be personal data; reasons reach logs).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from notifyd.schemas.contacts import PATTERN_MESSAGES as CONTACT_PATTERNS
from notifyd.schemas.contacts import EventRecipient, event_recipient_model
from notifyd.schemas.fields import (
    CATEGORY_PATTERN,
    PATTERN_MESSAGES,
    TEMPLATE_KEY_PATTERN,
    Category,
    Channel,
    Flag,
    TemplateKey,
    bounded,
    id_pattern_message,
    opaque_id,
)
from notifyd.schemas.reader import Reader
from notifyd.schemas.workflows import RUNS, WORKFLOW_KEY_PATTERN, WorkflowKey
from notifyd.settings import CHANNELS

_CHANNEL_NAME_SHOWN = 32
"""An unknown channel's name is echoed up to this long (a name, not personal data)."""


def _channels(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """The list's fault named on the list, with the first unknown channel."""
    choose = ", ".join(CHANNELS)
    if not isinstance(value, list) or not value:
        raise PydanticCustomError("channels", f"must be a non-empty list of: {choose}")
    unknown = [item for item in value if item not in CHANNELS]
    if unknown:
        first = unknown[0]
        shown = first if isinstance(first, str) and len(first) <= _CHANNEL_NAME_SHOWN else "…"
        raise PydanticCustomError(
            "channels",
            "unknown channel {shown}; choose from: {choose}",
            {"shown": repr(shown), "choose": choose},
        )
    return handler(value)


Channels = Annotated[list[Channel], WrapValidator(_channels)]


class Event(BaseModel):
    """A domain event: who it concerns, which template renders it, on which channels."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(description="The publisher's id: a second event is a replay.")
    tenant_id: str
    type: Category
    recipients: list[EventRecipient]
    template_key: TemplateKey
    context: dict[str, Any] | None = None
    channels: Channels | None = Field(
        None, description="Default: every channel a recipient has an address for."
    )
    category: Category | None = Field(None, description="Default: the event's type.")
    critical: Flag = False


_NAMES: dict[str, Any] = {  # the words publishers have always read
    CATEGORY_PATTERN: lambda value: "must be 1-64 letters, digits and _ . : -",
    TEMPLATE_KEY_PATTERN: lambda value: "must be 1-128 letters, digits and _ . : -",
}


@functools.cache
def event_reader(
    max_recipients: int, context_max_keys: int, id_max_length: int, id_pattern: str
) -> Reader[Event]:
    """`Event`'s reader with the bounds that are settings (made once per set of bounds)."""
    one_id = Annotated[str, opaque_id(id_max_length, id_pattern)]
    recipient: Any = event_recipient_model(id_max_length, id_pattern)
    recipients: Any = Annotated[
        list[recipient],
        Field(min_length=1, max_length=max_recipients),
    ]
    model = bounded(
        Event,
        event_id=(one_id, Field(description="The publisher's id: a second event is a replay.")),
        tenant_id=(one_id, ...),
        recipients=(recipients, ...),
        context=(Annotated[dict[str, Any], Field(max_length=context_max_keys)] | None, None),
    )
    patterns = {
        **PATTERN_MESSAGES,
        **CONTACT_PATTERNS,
        **_NAMES,
        **id_pattern_message(id_pattern),
    }
    return Reader(model, patterns)


def _not_runs(value: str) -> str:
    if value == RUNS:
        raise PydanticCustomError("workflow", f"{RUNS} names the runs, never a workflow")
    return value


class WorkflowEventHead(BaseModel):
    """An event naming a workflow: its own fields (the rest is the trigger API's body)."""

    model_config = ConfigDict(extra="ignore")  # the trigger's fields are read by its model

    event_id: str = Field(description="The publisher's id: a second event is a replay.")
    tenant_id: str
    type: Category
    workflow: Annotated[WorkflowKey, AfterValidator(_not_runs)]


WORKFLOW_EVENT_FIELDS = frozenset(WorkflowEventHead.model_fields)


@functools.cache
def workflow_event_reader(id_max_length: int, id_pattern: str) -> Reader[WorkflowEventHead]:
    """`WorkflowEventHead`'s reader with the id rule's bounds (made once per set)."""
    one_id = Annotated[str, opaque_id(id_max_length, id_pattern)]
    model = bounded(
        WorkflowEventHead,
        event_id=(one_id, Field(description="The publisher's id: a second event is a replay.")),
        tenant_id=(one_id, ...),
    )
    patterns = {
        **PATTERN_MESSAGES,
        **_NAMES,
        WORKFLOW_KEY_PATTERN: "must be 1-128 letters, digits and _ . : -",
        **id_pattern_message(id_pattern),
    }
    return Reader(model, patterns)
