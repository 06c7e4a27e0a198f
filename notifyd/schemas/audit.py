"""The audit log's list query."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, create_model

from notifyd.schemas.fields import PageQuery, opaque_id, text
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
    return create_model(
        "AuditQuery",
        __base__=AuditQuery,
        __module__=__name__,
        user_id=(
            Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)] | None,
            None,
        ),
    )
