"""Interview reminders as the pipeline sees them: their wheel entry, and what firing makes.

A fired reminder becomes ordinary notifications (in-app for candidate and employer always;
email and SMS where the create request gave a contact and allowed the channel), rendered by
the dispatcher from the tenant's `interview_reminder` template (or the built-in one), each
`critical` so opt-outs do not silence it, with the interview time written in the recipient's
own time zone.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg

from notifyd.keys import Keys
from notifyd.streams.schedule import Scheduled

TEMPLATE_KEY = "interview_reminder"
CATEGORY = "interview_reminder"
CHANNELS = ("in_app", "email", "sms")
ROLES = ("candidate", "employer")


def wheel_item(keys: Keys, tenant_id: str, reminder_id: uuid.UUID | str) -> Scheduled:
    """One member per reminder: rescheduling re-scores it, cancelling removes it."""
    return Scheduled(
        keys.reminders, {"v": "1", "tenant_id": tenant_id, "id": str(reminder_id)}, "reminder"
    )


def time_zone(name: str | None) -> ZoneInfo:
    if not name:
        return ZoneInfo("UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def format_interview_time(when: datetime, zone_name: str | None) -> str:
    """`Tuesday 10 March 2026, 11:00 CET (Europe/Berlin)`: unambiguous for the reader."""
    zone = time_zone(zone_name)
    local = when.astimezone(zone)
    label = zone.key
    return f"{local:%A} {local.day} {local:%B %Y, %H:%M} {local.tzname()} ({label})"


@dataclass(frozen=True, slots=True)
class PlannedNotification:
    channel: str
    recipient: str
    user_id: str
    locale: str | None
    context: dict[str, Any]


def plan(row: asyncpg.Record) -> list[PlannedNotification]:
    """The notifications one fired reminder produces, for both sides of the interview."""
    details: Mapping[str, Any] = row["details"] or {}
    allowed = set(details.get("channels") or CHANNELS)
    planned: list[PlannedNotification] = []
    for role in ROLES:
        user_id: str = row[f"{role}_id"]
        contact: Mapping[str, Any] = details.get(f"{role}_contact") or {}
        other = "employer" if role == "candidate" else "candidate"
        context = {
            "interview_time": format_interview_time(row["interview_time"], contact.get("timezone")),
            "interview_time_utc": row["interview_time"].isoformat(),
            "recipient_role": role,
            "application_id": row["application_id"],
            "candidate_name": (details.get("candidate_contact") or {}).get("name") or "",
            "employer_name": (details.get("employer_contact") or {}).get("name") or "",
            f"{other}_id": row[f"{other}_id"],
        }
        locale = contact.get("locale")
        planned.append(PlannedNotification("in_app", user_id, user_id, locale, context))
        if "email" in allowed and contact.get("email"):
            planned.append(PlannedNotification("email", contact["email"], user_id, locale, context))
        if "sms" in allowed and contact.get("phone"):
            planned.append(PlannedNotification("sms", contact["phone"], user_id, locale, context))
    return planned
