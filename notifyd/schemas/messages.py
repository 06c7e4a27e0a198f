"""1-on-1 messages: the send body, the list query and the mark-as-read body; and a chat
socket's message frame."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from notifyd.schemas.errors import FieldError
from notifyd.schemas.fields import Flag, PageQuery, bounded, id_list, opaque_id, optional_id, text
from notifyd.settings import Settings


class MessageSend(BaseModel):
    """A message to another user of the tenant (not the sender)."""

    model_config = ConfigDict(extra="forbid")

    receiver_id: str
    content: str


def send_model(settings: Settings) -> type[MessageSend]:
    """`MessageSend` with `message_max_length` and the id rule."""
    return bounded(
        MessageSend,
        receiver_id=(Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)], ...),
        content=(Annotated[str, text(settings.message_max_length)], ...),
    )


CLIENT_ID_MAX_LENGTH = 100


class ChatPost(BaseModel):
    """A chat socket's message frame, `{message, receiver_id?, client_id?}`: the content is
    bounded as a REST message's. Other keys (the frame's `type`) are the socket's business.
    Whether `receiver_id` is the room's other member is the room's question (`ws_chat`)."""

    model_config = ConfigDict(extra="ignore")

    message: str
    receiver_id: str | None = None
    client_id: Annotated[str, Field(max_length=CLIENT_ID_MAX_LENGTH)] | None = Field(
        None, description="The sender's own id for the message, echoed back."
    )


def chat_post_model(settings: Settings) -> type[ChatPost]:
    """`ChatPost` with `message_max_length`."""
    return bounded(ChatPost, message=(Annotated[str, text(settings.message_max_length)], ...))


class MessageQuery(PageQuery):
    """A page of the caller's messages, newest first; `with`: one conversation only."""

    with_: str | None = Field(None, alias="with", description="The other user's id.")


def query_model(settings: Settings) -> type[MessageQuery]:
    """`MessageQuery` with the id rule."""
    return bounded(
        MessageQuery, with_=optional_id(settings, alias="with", description="The other user's id.")
    )


_ONE_OF = 'send exactly one of "ids": [...], "with": <user id> or "all": true'


class MessageMarkRead(BaseModel):
    """Mark messages the caller received as read: these `ids`, those `with` one user, or
    `all`."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={  # `mark_read_problems`, for the document
            "oneOf": [
                {
                    "required": ["ids"],
                    "properties": {
                        "ids": {"type": "array"},
                        "with": {"type": "null"},
                        "all": {"enum": [None, False]},
                    },
                },
                {
                    "required": ["with"],
                    "properties": {
                        "ids": {"type": "null"},
                        "with": {"type": "string"},
                        "all": {"enum": [None, False]},
                    },
                },
                {
                    "required": ["all"],
                    "properties": {
                        "ids": {"type": "null"},
                        "with": {"type": "null"},
                        "all": {"const": True},
                    },
                },
            ]
        },
    )

    ids: list[uuid.UUID] | None = None
    with_: str | None = Field(None, alias="with")
    all: Flag | None = None


def mark_read_model(settings: Settings) -> type[MessageMarkRead]:
    """`MessageMarkRead` with `settings.mark_read_max_ids` and the id rule."""
    return bounded(
        MessageMarkRead, ids=id_list(settings), with_=optional_id(settings, alias="with")
    )


def mark_read_problems(
    values: Mapping[str, Any], at_fault: Collection[str] = ()
) -> list[FieldError]:
    """Exactly one of `ids`, `with` and `all: true` (nothing said when one is at fault)."""
    if at_fault:
        return []
    chosen = [
        name
        for name, key in (("ids", "ids"), ("with", "with_"), ("all", "all"))
        if values.get(key, values.get(name)) not in (None, False)
    ]
    return [] if len(chosen) == 1 else [FieldError("ids", _ONE_OF)]


class MessageCreated(BaseModel):
    message_id: uuid.UUID
    sent_at: str = Field(json_schema_extra={"format": "date-time"})


class Message(BaseModel):
    """A stored message (`http.messages.message_json`)."""

    id: uuid.UUID
    room: str = Field(description="The chat room the message belongs to.")
    sender_id: str
    receiver_id: str | None = Field(description="null in group rooms.")
    content: str
    sent_at: datetime
    is_read: bool
    read_at: datetime | None


class MarkReadResult(BaseModel):
    """How many messages were marked read."""

    updated: int
