"""Workflows (issue 27): the definition a PUT stores, a trigger, a cancel, the runs' list
query, and the answers.

Every value a tenant controls has a bound: the steps' count (`NOTIFYD_WORKFLOW_MAX_STEPS`),
every duration (`NOTIFYD_WORKFLOW_MAX_DELAY`), the recipients of one trigger or cancel
(`NOTIFYD_WORKFLOW_MAX_RECIPIENTS`), the data's keys (`NOTIFYD_CONTEXT_MAX_KEYS`, as a send's
context). Durations are written `90s`, `15m`, `2h`, `1d`; times of day `HH:MM` or `HH:MM:SS`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Mapping
from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import (
    WHOLE,
    Category,
    Channel,
    Flag,
    PageQuery,
    TemplateKey,
    anchored,
    bounded,
    opaque_id,
    optional_id,
)
from notifyd.settings import Settings

DURATION_PATTERN = r"^[1-9][0-9]{0,6}[smhd]$"
TIME_OF_DAY_PATTERN = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9](?::[0-5][0-9])?$"
DATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
WORKFLOW_KEY_PATTERN = anchored(r"[A-Za-z0-9_.:-]{1,128}")
RUNS = "runs"
"""The path segment of the runs (`/workflows/runs/`): no workflow may be called that."""

PATTERN_MESSAGES = {
    DURATION_PATTERN: "must be a duration such as 90s, 15m, 2h or 1d",
    TIME_OF_DAY_PATTERN: "must be a time of day, HH:MM or HH:MM:SS",
    DATA_KEY_PATTERN: "must be a data key: letters, digits and _, not starting with a digit",
    WORKFLOW_KEY_PATTERN: "may contain letters, digits and _ . : - only",
}
"""What a value missing each of these patterns is told (merged into the readers' patterns)."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}

Duration = Annotated[str, Field(pattern=DURATION_PATTERN, description="90s, 15m, 2h or 1d.")]
TimeOfDay = Annotated[str, Field(pattern=TIME_OF_DAY_PATTERN, description="HH:MM or HH:MM:SS.")]
DataKey = Annotated[str, Field(pattern=DATA_KEY_PATTERN)]
WorkflowKey = Annotated[str, Field(pattern=WORKFLOW_KEY_PATTERN)]

Unless = Literal["read", "online"]
"""`read`: the run's in-app notification was read; `online`: the recipient has a socket open."""

StepStatus = Literal["pending", "sent", "skipped", "cancelled", "throttled", "failed"]
"""A step's state (the `workflow_steps.status` CHECK in sql/)."""

RunStatus = Literal["pending", "completed", "cancelled", "throttled"]
"""A run's state as answered: `pending` while a step is, else how it ended."""


def _at_most(n: int) -> str:
    """A regular expression for the integers 1..n (n >= 1), written without leading zeros."""
    digits = str(n)
    shorter = {1: [], 2: ["[1-9]"]}.get(len(digits), [f"[1-9][0-9]{{0,{len(digits) - 2}}}"])
    found = list(shorter)
    for index, digit in enumerate(digits):  # n's first digits, then a smaller one, then any
        low = 1 if index == 0 else 0
        high = int(digit) - 1
        if high >= low:
            rest = len(digits) - index - 1
            smaller = str(low) if high == low else f"[{low}-{high}]"
            tail = {0: "", 1: "[0-9]"}.get(rest, f"[0-9]{{{rest}}}")
            found.append(digits[:index] + smaller + tail)
    return "|".join([*found, digits])


def duration_pattern(max_delay: float) -> str:
    """`DURATION_PATTERN` within `max_delay` seconds: what `definition_rules` checks, in the
    document (each unit's greatest count spelt out)."""
    units = []
    for unit, seconds in _UNITS.items():
        most = min(int(max_delay // seconds), 9_999_999)  # DURATION_PATTERN's seven digits
        if most >= 1:
            units.append(f"(?:{_at_most(most)}){unit}")
    return f"^(?:{'|'.join(units)})$"


def duration(text: str) -> timedelta:
    """`"15m"` → 15 minutes; the text matched `DURATION_PATTERN` (the model checked it)."""
    return timedelta(seconds=int(text[:-1]) * _UNITS[text[-1]])


def time_of_day(text: str) -> time:
    """`"21:00"` → 21:00; the text matched `TIME_OF_DAY_PATTERN`."""
    return time.fromisoformat(text)


class WorkflowStep(BaseModel):
    """One step: which channel and template, how long after the trigger, and when not."""

    model_config = ConfigDict(extra="forbid")

    channel: Channel
    template_key: TemplateKey
    delay: Duration | None = Field(None, description="After the trigger (or send_at).")
    unless: Annotated[list[Unless], Field(max_length=2)] = Field(
        default_factory=list,
        description="Skip the step when any of these holds at its time.",
        json_schema_extra={"uniqueItems": True},  # `definition_rules`
    )
    critical_only: Flag = Field(False, description="Only for triggers marked critical.")


class Digest(BaseModel):
    """Triggers within `window` of the first, for the same recipient and `data[key]`, merge
    into one run whose steps start when the window closes."""

    model_config = ConfigDict(extra="forbid")

    window: Duration
    key: DataKey


class Throttle(BaseModel):
    """At most `limit` runs per recipient and workflow per `per`; a trigger past it makes a
    `throttled` run that sends nothing."""

    model_config = ConfigDict(extra="forbid")

    limit: Annotated[StrictInt, Field(ge=1, le=10_000), WHOLE]
    per: Duration


class QuietHours(BaseModel):
    """A step falling inside [start, end) of the recipient's day (in their time zone) waits
    until `end`; critical triggers do not wait."""

    model_config = ConfigDict(extra="forbid")

    start: TimeOfDay
    end: TimeOfDay = Field(description="HH:MM or HH:MM:SS; not the same time as start.")


class WorkflowDefinition(BaseModel):
    """A workflow: its steps in order, and the policies around them. A PUT replaces it."""

    model_config = ConfigDict(extra="forbid")

    category: Category | None = Field(None, description="Matched by the users' preferences.")
    steps: list[WorkflowStep]
    digest: Digest | None = None
    throttle: Throttle | None = None
    quiet_hours: QuietHours | None = None


def definition_model(settings: Settings) -> type[WorkflowDefinition]:
    """`WorkflowDefinition` with the steps' bound (`NOTIFYD_WORKFLOW_MAX_STEPS`); its JSON
    Schema also bounds every duration by `NOTIFYD_WORKFLOW_MAX_DELAY` (`definition_rules`)."""
    model = bounded(
        WorkflowDefinition,
        steps=(
            Annotated[
                list[WorkflowStep], Field(min_length=1, max_length=settings.workflow_max_steps)
            ],
            ...,
        ),
    )
    within = {"pattern": duration_pattern(settings.workflow_max_delay)}

    def at(*path: str) -> dict[str, Any]:
        schema: dict[str, Any] = within
        for name in reversed(path):
            schema = {"items": schema} if name == "[]" else {"properties": {name: schema}}
        return schema

    # create_model takes no config beside a base: the subclass's own config dict, read when
    # the document is generated
    model.model_config["json_schema_extra"] = {
        "allOf": [at("steps", "[]", "delay"), at("digest", "window"), at("throttle", "per")]
    }
    return model


def _get(value: Any, name: str) -> Any:
    """A field of a model or of the raw object it came from (the rules also run over the
    raw values when some other field failed, so one answer names everything)."""
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


_DURATION = re.compile(DURATION_PATTERN)
_TIME_OF_DAY = re.compile(TIME_OF_DAY_PATTERN)


def _too_long(text: Any, bound: timedelta) -> bool:
    return isinstance(text, str) and bool(_DURATION.match(text)) and duration(text) > bound


def _bound_text(bound: timedelta) -> str:
    return f"must be at most {int(bound.total_seconds())}s"


def definition_rules(max_delay: float) -> Any:
    """The rules no single field says: durations within `max_delay`, `unless` without
    repeats (the document says both: `duration_pattern`, `uniqueItems`)."""
    bound = timedelta(seconds=max_delay)

    def rules(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
        found: list[FieldError] = []
        steps = values.get("steps")
        for index, step in enumerate(steps if isinstance(steps, list) else []):
            if _too_long(_get(step, "delay"), bound):
                found.append(FieldError(f"steps[{index}].delay", _bound_text(bound)))
            unless = _get(step, "unless")
            if (
                isinstance(unless, list)
                and all(isinstance(u, str) for u in unless)
                and len(set(unless)) != len(unless)
            ):
                found.append(FieldError(f"steps[{index}].unless", "must not repeat a value"))
        if _too_long(_get(values.get("digest"), "window"), bound):
            found.append(FieldError("digest.window", _bound_text(bound)))
        if _too_long(_get(values.get("throttle"), "per"), bound):
            found.append(FieldError("throttle.per", _bound_text(bound)))
        return [f for f in found if f.field not in at_fault]

    return rules


def definition_refusals(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    """A quiet window that is not empty: `21:00` to `21:00:00` compares two fields' times,
    which the document cannot say (422 `unsendable` when it is the only fault)."""
    if "quiet_hours" in at_fault:
        return []
    quiet = values.get("quiet_hours")
    start, end = _get(quiet, "start"), _get(quiet, "end")
    if (
        isinstance(start, str)
        and isinstance(end, str)
        and _TIME_OF_DAY.match(start)
        and _TIME_OF_DAY.match(end)
        and time_of_day(start) == time_of_day(end)
    ):
        return [FieldError("quiet_hours.end", "must differ from start")]
    return []


# The rules of a trigger's `data` and `send_at` a JSON schema cannot state (a NUL anywhere in
# a nested value, a time relative to now) are said in the fields' descriptions, and applied by
# `trigger_refusals`.
DATA_TEXT = "The templates' values; no NUL character in any key or string, nested ones too."


class WorkflowTrigger(BaseModel):
    """Start the workflow for each recipient: one run each."""

    model_config = ConfigDict(extra="forbid")

    recipients: list[str]
    data: dict[str, Any] = Field(default_factory=dict, description=DATA_TEXT)
    send_at: AwareDatetime | None = Field(None, description="Delays count from here.")
    cancel_key: str | None = Field(None, description="What a cancel names these runs by.")
    critical: Flag = Field(False, description="Ignores preferences; runs critical_only steps.")


class WorkflowCancel(BaseModel):
    """Cancel every step not yet sent of the runs with `cancel_key` (of these recipients)."""

    model_config = ConfigDict(extra="forbid")

    cancel_key: str
    recipients: list[str] | None = None


def _ids(settings: Settings) -> Any:
    """Recipients: by the id rule, without repeats (`_repeats`), at most
    `NOTIFYD_WORKFLOW_MAX_RECIPIENTS`."""
    return Annotated[
        list[Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)]],
        Field(
            min_length=1,
            max_length=settings.workflow_max_recipients,
            json_schema_extra={"uniqueItems": True},
        ),
    ]


def trigger_model(settings: Settings) -> type[WorkflowTrigger]:
    """`WorkflowTrigger` with the id rule and the recipients' and data's bounds."""
    return bounded(
        WorkflowTrigger,
        recipients=(_ids(settings), ...),
        data=(
            Annotated[dict[str, Any], Field(max_length=settings.context_max_keys)],
            Field(default_factory=dict, description=DATA_TEXT),
        ),
        send_at=(
            AwareDatetime | None,
            Field(
                None,
                description="Delays count from here; at most "
                f"{int(settings.workflow_max_delay)} s ahead (NOTIFYD_WORKFLOW_MAX_DELAY).",
            ),
        ),
        cancel_key=optional_id(settings, description="What a cancel names these runs by."),
    )


def cancel_model(settings: Settings) -> type[WorkflowCancel]:
    """`WorkflowCancel` with the id rule and the recipients' bound."""
    key = Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)]
    return bounded(
        WorkflowCancel,
        cancel_key=(key, ...),
        recipients=(_ids(settings) | None, None),
    )


def _repeats(name: str, ids: Any) -> list[FieldError]:
    seen: set[str] = set()
    found = []
    for index, value in enumerate(ids if isinstance(ids, list) else []):
        if value in seen:
            found.append(FieldError(f"{name}[{index}]", "appears twice"))
        seen.add(value)
    return found[:1]


def has_nul(value: Any) -> bool:
    """Whether a NUL character is anywhere in a JSON value, keys included (PostgreSQL's jsonb
    refuses it). A walk with a stack: a deeply nested value cannot exhaust the recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            if any(isinstance(k, str) and "\x00" in k for k in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def trigger_rules(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    """Recipients without repeats (the document's `uniqueItems`)."""
    if "recipients" in at_fault:
        return []
    return _repeats("recipients", values.get("recipients"))


def trigger_refusals(max_ahead: float) -> Any:
    """What the document does not say of a trigger (422 `unsendable` when it is the only
    fault): `send_at` not further ahead than `max_ahead` seconds from now; `data` without NUL
    characters anywhere, keys too (PostgreSQL's jsonb refuses them)."""

    def rules(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
        found = []
        if "data" not in at_fault and has_nul(values.get("data")):
            found.append(FieldError("data", "must not contain NUL characters"))
        send_at = values.get("send_at")
        if isinstance(send_at, str):  # raw: another field failed
            try:
                send_at = datetime.fromisoformat(send_at)
            except ValueError:
                send_at = None
        if isinstance(send_at, datetime) and send_at.tzinfo is None:
            send_at = None
        ahead = datetime.now(UTC) + timedelta(seconds=max_ahead)
        if isinstance(send_at, datetime) and "send_at" not in at_fault and send_at > ahead:
            found.append(FieldError("send_at", f"must be at most {int(max_ahead)}s ahead"))
        return found

    return rules


def cancel_rules(values: Mapping[str, Any], at_fault: Collection[str]) -> list[FieldError]:
    if "recipients" in at_fault:
        return []
    return _repeats("recipients", values.get("recipients"))


class RunQuery(PageQuery):
    """A page of the runs of one recipient (or the tenant's), newest first."""

    recipient: str | None = None
    workflow_key: WorkflowKey | None = None


# ---------------------------------------------------------------- answers


class Workflow(WorkflowDefinition):
    """A stored workflow (the answer of PUT and GET)."""

    model_config = ConfigDict(extra="ignore")

    workflow_key: str
    created_at: datetime
    updated_at: datetime


class RunStarted(BaseModel):
    run_id: uuid.UUID
    recipient: str


class WorkflowTriggered(BaseModel):
    """The 202 of a trigger: one run per recipient, in the order given."""

    runs: list[RunStarted]


class WorkflowCancelled(BaseModel):
    """How many runs had a step cancelled: none of their steps is sent after this answer."""

    cancelled: int


class StepState(BaseModel):
    position: int
    channel: Channel
    template_key: str
    unless: list[Unless]
    status: StepStatus
    reason: str | None
    due_at: datetime
    done_at: datetime | None
    lateness_ms: int | None
    notification_ids: list[uuid.UUID]


class DigestState(BaseModel):
    """A digest run: the value of `data[key]` it merges, when it stops taking triggers, and
    how many it holds."""

    key: str
    closes_at: datetime
    items: int


class WorkflowRun(BaseModel):
    """A run and each of its steps."""

    run_id: uuid.UUID
    workflow_key: str
    recipient: str
    status: RunStatus
    cancel_key: str | None
    critical: bool
    data: dict[str, Any]
    created_by: str
    starts_at: datetime
    digest: DigestState | None
    created_at: datetime
    updated_at: datetime
    steps: list[StepState]
