"""Workflow runs as the pipeline sees them: what a trigger starts, a step's wheel entry, the
steps a trigger plans, and the address a step sends to.

A trigger makes one run per recipient and one row per step, each due at the trigger's time
(or `send_at`) plus the step's `delay`. A `critical_only` step of a trigger that is not
critical is `skipped` at once (reason `not_critical`); every other step waits on the timer
wheel for its time (`actors.workflow_firer`).

`start_runs` is the one rule of a trigger, whoever asked (`POST /workflows/{key}/trigger/`,
or an ingested event naming a `workflow`): digests joined, throttles counted, runs and
steps stored, inside the caller's transaction (which also holds its audit row and its
idempotency record or deduplication row); `put_on_wheel` after the commit.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from redis.exceptions import RedisError

from notifyd.ids import uuid7
from notifyd.keys import Keys
from notifyd.payloads import dumps
from notifyd.schemas.workflows import (
    Throttle,
    WorkflowDefinition,
    WorkflowTrigger,
    duration,
    time_of_day,
)
from notifyd.store import workflows as store
from notifyd.store.pool import Conn
from notifyd.store.workflows import NewStep
from notifyd.streams.schedule import Schedule, Scheduled

log = logging.getLogger("notifyd.workflows")

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


# ---------------------------------------------------------------- triggers


@dataclass(frozen=True, slots=True)
class Started:
    """What one trigger did: `runs` new (digests joined are not among them), and each
    recipient's run in the trigger's order."""

    runs: list[store.NewRun]
    run_of: dict[str, uuid.UUID]  # recipient → the run that has their trigger
    recipients: list[str]
    merged: int  # recipients whose trigger joined an open digest

    def answer(self) -> dict[str, Any]:
        """`202 {runs: [{run_id, recipient}]}`, in the trigger's order."""
        return {"runs": [{"run_id": str(self.run_of[r]), "recipient": r} for r in self.recipients]}

    def audit_details(self, key: str, trigger: WorkflowTrigger) -> dict[str, Any]:
        """What the `workflow.trigger` audit row says."""
        return {
            "workflow_key": key,
            "run_ids": [str(self.run_of[r]) for r in self.recipients],
            "merged": self.merged,
            "cancel_key": trigger.cancel_key,
            "critical": trigger.critical,
        }


def digest_text(value: Any) -> str:
    """The digest key's value as stored: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else dumps(value).decode()


async def start_runs(
    conn: Conn,
    *,
    tenant_id: str,
    key: str,
    stored: Mapping[str, Any],
    trigger: WorkflowTrigger,
    created_by: str,
    digest_max_items: int,
) -> Started:
    """A trigger of the workflow `key` (its stored definition `stored`) for each of its
    recipients: joined to their open digest run, or a new run (throttled past the
    workflow's throttle) with its steps. Call inside the caller's transaction."""
    definition = WorkflowDefinition.model_validate(stored)
    starts_at = trigger.send_at or datetime.now(UTC)
    digest = definition.digest
    digest_value = None if digest is None else trigger.data.get(digest.key)
    # a digest run takes triggers until its window closes; its steps start then
    closes_at = None
    if digest is not None and digest_value is not None:
        closes_at = starts_at + duration(digest.window)
    runs = [
        store.NewRun(
            id=uuid7(),
            tenant_id=tenant_id,
            workflow_key=key,
            recipient=recipient,
            definition=dict(stored),
            data=trigger.data,
            critical=trigger.critical,
            cancel_key=trigger.cancel_key,
            created_by=created_by,
            starts_at=starts_at,
            steps=plan_steps(definition, closes_at or starts_at, critical=trigger.critical),
            digest_key=None if closes_at is None else digest_text(digest_value),
            digest_closes_at=closes_at,
        )
        for recipient in trigger.recipients
    ]
    joined: dict[str, uuid.UUID] = {}
    if closes_at is not None:
        await store.lock_recipients(conn, tenant_id, key, trigger.recipients)
        joined = await store.join_digests(
            conn,
            tenant_id,
            key,
            trigger.recipients,
            digest_text(digest_value),
            trigger.data,
            digest_max_items,
        )
        runs = [run for run in runs if run.recipient not in joined]
    if definition.throttle is not None:
        runs = await _throttle(conn, tenant_id, key, definition.throttle, runs)
    await store.insert_runs(conn, runs)
    return Started(
        runs=runs,
        run_of={run.recipient: run.id for run in runs} | joined,
        recipients=list(trigger.recipients),
        merged=len(joined),
    )


async def _throttle(
    conn: Conn, tenant_id: str, key: str, throttle: Throttle, runs: list[store.NewRun]
) -> list[store.NewRun]:
    """`runs` with those past the throttle marked `throttled` (their steps too): at most
    `limit` runs per recipient and workflow within `per`, counting these in order."""
    window = duration(throttle.per).total_seconds()
    counts = await store.recent_runs(conn, tenant_id, key, [r.recipient for r in runs], window)
    decided = []
    for run in runs:
        seen = counts.get(run.recipient, 0)
        if seen >= throttle.limit:
            run = dataclasses.replace(run, status="throttled", steps=throttled(run.steps))
        else:
            counts[run.recipient] = seen + 1
        decided.append(run)
    return decided


async def put_on_wheel(schedule: Schedule, keys: Keys, started: Started) -> None:
    """After the commit: every pending step of the new runs on the timer wheel. The rows are
    the truth: if Redis fails here, the sweeper's rebuild and overdue check put the steps
    on the wheel from PostgreSQL."""
    items = [
        (wheel_item(keys, run.tenant_id, run.id, step.position), step.due_at)
        for run in started.runs
        for step in run.steps
        if step.status == "pending"
    ]
    try:
        await schedule.add_many(items)
    except RedisError as exc:
        log.warning("steps not put on the wheel; left for the sweeper", extra={"error": repr(exc)})
