"""Interview reminders: the list query. (The create and reschedule bodies are still read by
`http.validation.Fields`; they move here next.)"""

from __future__ import annotations

from typing import Literal, get_args

from notifyd.schemas.fields import PageQuery, bounded, optional_id
from notifyd.settings import Settings

ReminderStatus = Literal["scheduled", "fired", "skipped", "cancelled"]
"""A reminder's state (the `interview_reminders.status` CHECK in sql/)."""
STATUSES = get_args(ReminderStatus)


class ReminderQuery(PageQuery):
    """A page of the reminders the caller may see, newest first."""

    status: ReminderStatus | None = None
    application_id: str | None = None


def query_model(settings: Settings) -> type[ReminderQuery]:
    """`ReminderQuery` with the id rule."""
    return bounded(ReminderQuery, application_id=optional_id(settings))
