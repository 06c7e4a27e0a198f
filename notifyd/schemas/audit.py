"""The audit log's list query and its entries."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field

from notifyd.schemas.fields import PageQuery, text

ACTION_MAX_LENGTH = 64


class AuditQuery(PageQuery):
    """A page of the tenant's audit log, newest first, optionally one action or one user's."""

    action: Annotated[str, text(ACTION_MAX_LENGTH)] | None = Field(
        None, description="e.g. notification.send"
    )
    user_id: str | None = None


class AuditEntry(BaseModel):
    """One audit row: who did what, from where."""

    id: uuid.UUID
    user_id: str | None
    action: str
    ip_address: str | None
    request_id: str | None
    details: dict[str, Any]
    timestamp: datetime
