"""Group chat rooms: the create-room and add-members bodies."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from notifyd import tags
from notifyd.schemas.fields import Message, anchored, bounded, opaque_id
from notifyd.settings import Settings

TITLE_MAX_LENGTH = 200
ROOM_NAME_PATTERN = anchored(tags.ROOM_NAME.pattern)
NO_NUL_PATTERN = r"^[^\x00]*$"
"""A title may be empty or blank, never hold a NUL (PostgreSQL refuses it)."""

PATTERN_MESSAGES: dict[str, Message] = {
    ROOM_NAME_PATTERN: "may only contain A-Z a-z 0-9 _ - (at most 100 characters)",
    NO_NUL_PATTERN: "must not contain NUL characters",
}

_MEMBERS = "User ids; a user who creates a room is always its owner"


class RoomCreate(BaseModel):
    """A group room and its first members. Whether the caller joins (a user does, as the
    owner; services and admins act for the tenant) decides if `members` may be empty and
    whether the room is full: a 422 of type `unsendable`, as the document cannot say it."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=ROOM_NAME_PATTERN)] | None = Field(
        None, description="Chosen name; generated when left out"
    )
    title: Annotated[str, Field(max_length=TITLE_MAX_LENGTH, pattern=NO_NUL_PATTERN)] | None = None
    members: list[str] = Field(description=_MEMBERS)


class RoomMembersAdd(BaseModel):
    """Users to add to a group room (those already in it are skipped)."""

    model_config = ConfigDict(extra="forbid")

    members: list[str]


def _members(settings: Settings, description: str | None = None) -> object:
    """(type, default) of `members`: at most `room_max_members` ids, each by the id rule."""
    one = Annotated[str, opaque_id(settings.id_max_length, settings.id_pattern)]
    many = Annotated[
        list[one],
        Field(max_length=settings.room_max_members, description=description),
    ]
    return many, ...


def create_model(settings: Settings) -> type[RoomCreate]:
    """`RoomCreate` with `room_max_members` and the id rule."""
    return bounded(RoomCreate, members=_members(settings, _MEMBERS))


def add_members_model(settings: Settings) -> type[RoomMembersAdd]:
    """`RoomMembersAdd` with `room_max_members` and the id rule."""
    return bounded(RoomMembersAdd, members=_members(settings))


class RoomMember(BaseModel):
    """A group room's member."""

    user_id: str
    role: Literal["owner", "member"]
    joined_at: datetime
    last_read_id: uuid.UUID | None


class RoomSummary(BaseModel):
    """A group room in the caller's list."""

    name: str
    kind: Literal["group"]
    title: str
    created_by: str
    created_at: datetime


class GroupRoom(RoomSummary):
    """A group room and its members."""

    members: list[RoomMember]


class DmRoom(BaseModel):
    """A 1-on-1 room: derived from its two users, never stored."""

    name: str
    kind: Literal["dm"]
    members: list[str] = Field(description="The two user ids.")


class Room(RootModel[Annotated[GroupRoom | DmRoom, Field(discriminator="kind")]]):
    """A room as GET /rooms/{room}/, GET /rooms/dm/{user}/ and POST /rooms/ answer it."""


class RoomMembersAdded(BaseModel):
    """The users added (those already in the room are not)."""

    added: list[str]
