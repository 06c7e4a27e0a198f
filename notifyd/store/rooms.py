"""Group chat rooms and their members (1-on-1 rooms are derived, never stored)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from notifyd.store.pool import Conn, Executor

INSERT_ROOM = """
INSERT INTO rooms (id, tenant_id, name, title, created_by)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, name) DO NOTHING
RETURNING created_at
"""

INSERT_MEMBERS = """
INSERT INTO room_members (room_id, tenant_id, user_id, role)
SELECT $1, $2, member, CASE WHEN member = $4 THEN 'owner' ELSE 'member' END
FROM unnest($3::text[]) AS member
ON CONFLICT (room_id, user_id) DO NOTHING
RETURNING user_id
"""

GET_ROOM = """
SELECT id, tenant_id, name, title, created_by, created_at FROM rooms
WHERE tenant_id = $1 AND name = $2
"""

MEMBERS = """
SELECT user_id, role, joined_at, last_read_id FROM room_members
WHERE room_id = $1 ORDER BY joined_at, user_id
"""

MEMBER_ROLE = "SELECT role FROM room_members WHERE room_id = $1 AND user_id = $2"

REMOVE_MEMBER = "DELETE FROM room_members WHERE room_id = $1 AND user_id = $2"

ROOMS_OF_USER = """
SELECT r.id, r.tenant_id, r.name, r.title, r.created_by, r.created_at
FROM room_members m JOIN rooms r ON r.id = m.room_id
WHERE m.tenant_id = $1 AND m.user_id = $2 AND ($3::uuid IS NULL OR r.id < $3)
ORDER BY r.id DESC
LIMIT $4
"""

# monotonic: a late or repeated receipt never moves the marker back
MARK_READ = """
UPDATE room_members
SET last_read_id = CASE WHEN last_read_id IS NULL OR last_read_id < $3 THEN $3
                        ELSE last_read_id END
WHERE room_id = $1 AND user_id = $2
RETURNING last_read_id
"""


@dataclass(frozen=True, slots=True)
class RoomRow:
    """A group room; its fields are GET_ROOM's and ROOMS_OF_USER's columns, in order."""

    id: uuid.UUID
    tenant_id: str
    name: str
    title: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Member:
    """A room's member; its fields are MEMBERS' columns, in order."""

    user_id: str
    role: str
    joined_at: datetime
    last_read_id: uuid.UUID | None


async def create(
    conn: Conn,
    room_id: uuid.UUID,
    tenant_id: str,
    name: str,
    title: str,
    created_by: str,
    members: list[str],
    owner: str | None,
) -> datetime | None:
    """Creates the room with its members (`owner` among them as the owner); None if the
    name is taken."""
    created_at: datetime | None = await conn.fetchval(
        INSERT_ROOM, room_id, tenant_id, name, title, created_by
    )
    if created_at is not None:
        await conn.fetch(INSERT_MEMBERS, room_id, tenant_id, members, owner)
    return created_at


async def get(conn: Executor, tenant_id: str, name: str) -> RoomRow | None:
    row = await conn.fetchrow(GET_ROOM, tenant_id, name)
    return RoomRow(*row) if row is not None else None


async def members(conn: Executor, room_id: uuid.UUID) -> list[Member]:
    return [Member(*row) for row in await conn.fetch(MEMBERS, room_id)]


async def role_of(conn: Executor, room_id: uuid.UUID, user_id: str) -> str | None:
    """'owner', 'member', or None for someone outside the room."""
    role: str | None = await conn.fetchval(MEMBER_ROLE, room_id, user_id)
    return role


async def add_members(
    conn: Conn, room_id: uuid.UUID, tenant_id: str, user_ids: list[str]
) -> list[str]:
    """Adds those not yet members; returns who was added."""
    rows = await conn.fetch(INSERT_MEMBERS, room_id, tenant_id, user_ids, None)
    return [user_id for (user_id,) in rows]


async def remove_member(conn: Conn, room_id: uuid.UUID, user_id: str) -> bool:
    status = await conn.execute(REMOVE_MEMBER, room_id, user_id)
    return bool(status.endswith(" 1"))


async def rooms_of(
    conn: Executor, tenant_id: str, user_id: str, *, before: uuid.UUID | None, limit: int
) -> list[RoomRow]:
    return [
        RoomRow(*row) for row in await conn.fetch(ROOMS_OF_USER, tenant_id, user_id, before, limit)
    ]


async def mark_read(conn: Conn, room_id: uuid.UUID, user_id: str, up_to: uuid.UUID) -> bool:
    """Moves the member's read marker forward; False when the user is not a member."""
    marker = await conn.fetchval(MARK_READ, room_id, user_id, up_to)
    return marker is not None
