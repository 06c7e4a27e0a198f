"""Workflow runs as the pipeline sees them: a step's wheel entry, the steps a trigger plans,
and the address a step sends to.

A trigger makes one run per recipient and one row per step, each due at the trigger's time
(or `send_at`) plus the step's `delay`. A `critical_only` step of a trigger that is not
critical is `skipped` at once (reason `not_critical`); every other step waits on the timer
wheel for its time (`actors.workflow_firer`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from notifyd.keys import Keys
from notifyd.schemas.workflows import WorkflowDefinition, duration, time_of_day
from notifyd.store.workflows import NewStep
from notifyd.streams.schedule import Scheduled

REASONS = (
    "read",
    "online",
    "opted_out",
    "no_address",
    "not_critical",
    "render",
    "cancelled",
    "throttle",
    "quiet_hours",
)
"""Why a step did not send (`workflow_steps.reason`); `render`: its template could not."""


def wheel_item(keys: Keys, tenant_id: str, run_id: uuid.UUID | str, position: int) -> Scheduled:
    """One member per step: cancelling removes it, the rebuild re-adds it (NX)."""
    return Scheduled(
        keys.workflow_steps,
        {"v": "1", "tenant_id": tenant_id, "run_id": str(run_id), "position": str(position)},
        "workflow-step",
    )


def plan_steps(
    definition: WorkflowDefinition, starts_at: datetime, *, critical: bool
) -> list[NewStep]:
    """The rows of one run's steps, in the definition's order."""
    steps = []
    for position, step in enumerate(definition.steps):
        delay = duration(step.delay) if step.delay else timedelta(0)
        skipped = step.critical_only and not critical
        steps.append(
            NewStep(
                position=position,
                channel=step.channel,
                template_key=step.template_key,
                unless=list(step.unless),
                due_at=starts_at + delay,
                status="skipped" if skipped else "pending",
                reason="not_critical" if skipped else None,
            )
        )
    return steps


def throttled(steps: list[NewStep]) -> list[NewStep]:
    """The steps of a run past its workflow's throttle: none is sent."""
    return [
        NewStep(
            position=step.position,
            channel=step.channel,
            template_key=step.template_key,
            unless=step.unless,
            due_at=step.due_at,
            status="throttled",
            reason="throttle",
        )
        for step in steps
    ]


def address(channel: str, user_id: str, email: str | None, phone: str | None) -> str | None:
    """Where a step of `channel` goes: the user for in-app, else the recipient's stored
    address (None: the step is skipped, `no_address`)."""
    if channel == "in_app":
        return user_id
    if channel == "email":
        return email
    if channel == "sms":
        return phone
    return None


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _inside(moment: time, start: time, end: time) -> bool:
    """Whether `moment` falls in [start, end), a window that may wrap midnight."""
    if start < end:
        return start <= moment < end
    return moment >= start or moment < end


def quiet_until(
    now: datetime, quiet_hours: Mapping[str, Any] | None, zone_name: str | None
) -> datetime | None:
    """When a step due `now` may go, if `now` falls inside the quiet hours of the
    recipient's zone (UTC when they have none): the window's next end, as an aware
    datetime; None when it may go now (no quiet hours, or outside them)."""
    if not quiet_hours:
        return None
    start, end = time_of_day(quiet_hours["start"]), time_of_day(quiet_hours["end"])
    zone = _zone(zone_name)
    local = now.astimezone(zone)
    if not _inside(local.time().replace(tzinfo=None), start, end):
        return None
    until = datetime.combine(local.date(), end, tzinfo=zone)
    if until <= local:
        until = datetime.combine(local.date() + timedelta(days=1), end, tzinfo=zone)
    return until
