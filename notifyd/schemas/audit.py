"""The audit log's list query."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from notifyd.schemas.fields import PageQuery, bounded, optional_id, text
from notifyd.settings import Settings

ACTION_MAX_LENGTH = 64


class AuditQuery(PageQuery):
    """A page of the tenant's audit log, newest first, optionally one action or one user's."""

    action: Annotated[str, text(ACTION_MAX_LENGTH)] | None = Field(
        None, description="e.g. notification.send"
    )
    user_id: str | None = None


def query_model(settings: Settings) -> type[AuditQuery]:
    """`AuditQuery` with the id rule."""
    return bounded(AuditQuery, user_id=optional_id(settings))
