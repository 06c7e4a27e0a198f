"""The suppression list's answer (`GET /suppressions/`): who may no longer be sent to, and why.

Its reasons are `notifyd.suppressions.Reason`, the one list the dispatcher and the routes
use; an entry is written by notifyd (a bounce, a refusal, an opt-out, a complaint, a click),
never posted, so only the answer has a model.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from notifyd.suppressions import Reason


class Suppression(BaseModel):
    """One entry (`http.suppressions.suppression_json`)."""

    id: uuid.UUID
    channel: Literal["email", "sms"]
    address: str = Field(description="email lower-cased; SMS in E.164")
    category: str | None = Field(description="null: every category; else the one suppressed")
    reason: Reason
    source: str = Field(description="what said so, in its words")
    notification_id: uuid.UUID | None
    created_at: datetime
