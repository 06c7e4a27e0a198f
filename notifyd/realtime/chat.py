"""Chat rooms: who may be in one, and what happens when someone writes or reads in it.

A 1-on-1 room is not stored: its name (see `roomname`) says who its two members are, and its
messages are the ordinary 1-on-1 messages of `POST /messages/send/` and `GET /messages/`,
so a message is the same record whichever door it came through. A group room is a row with
members. Either way a room belongs to one tenant (the caller's, from the token): the same name
in another tenant is another room, and knowing a name never lets anyone in.

Writing is two steps on purpose: the caller stores the message (and its audit row) in its own
transaction, then `announce` publishes it. Live fan-out happens only for what is committed;
if the process dies between the two, the message is still in `GET /messages/` and
`GET /rooms/{name}/messages/`, which is where a client that saw a `gap` looks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from notifyd.ids import uuid7
from notifyd.payloads import dumps
from notifyd.realtime.history import Feed, History
from notifyd.realtime.roomname import dm_members, dm_name
from notifyd.store import messages as message_store
from notifyd.store import rooms as room_store
from notifyd.store.audit import AuditEntry
from notifyd.store.batch import GroupCommit
from notifyd.store.pool import Conn

log = logging.getLogger("notifyd.realtime.chat")


class RoomNotFound(Exception):
    """No such room in the caller's tenant."""


class NotAMember(Exception):
    """The room exists (or is a 1-on-1 room of others) but the caller is not in it."""


@dataclass(frozen=True, slots=True)
class Room:
    tenant_id: str
    name: str
    room_id: uuid.UUID | None  # set for group rooms
    pair: tuple[str, str] | None  # set for 1-on-1 rooms

    @classmethod
    def dm(cls, tenant_id: str, user_a: str, user_b: str) -> Room:
        """The 1-on-1 room of two users (no lookup: the pair is the room)."""
        name = dm_name(user_a, user_b)
        return cls(tenant_id, name, None, dm_members(name))

    @property
    def is_dm(self) -> bool:
        return self.pair is not None

    def peer_of(self, user_id: str) -> str | None:
        """The other member of a 1-on-1 room."""
        if self.pair is None:
            return None
        low, high = self.pair
        return high if user_id == low else low


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class ChatMessage:
    id: uuid.UUID
    room: Room
    sender_id: str
    receiver_id: str | None
    content: str
    sent_at: datetime

    def event(self, client_id: str | None = None) -> dict[str, Any]:
        """What every member's socket receives (the seed's `{message, sender_id, sent_at}`)."""
        event: dict[str, Any] = {
            "type": "message",
            "room": self.room.name,
            "id": str(self.id),
            "sender_id": self.sender_id,
            "receiver_id": self.receiver_id,
            "message": self.content,
            "sent_at": self.sent_at.isoformat(),
        }
        if client_id is not None:
            event["client_id"] = client_id
        return event


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Draft:
    """A message on its way in: stored by `Chat.post` together with others sent meanwhile."""

    room: Room
    sender_id: str
    # `room.peer_of(sender_id)`: the other member of a 1-on-1 room, None in a group room;
    # a socket works it out once for all its messages
    receiver_id: str | None
    content: str
    audit: AuditEntry
    client_id: str | None = None
    id: uuid.UUID = field(default_factory=uuid7)


class Chat:
    def __init__(
        self, pool: asyncpg.Pool, history: History, *, max_batch: int = 256, writers: int = 2
    ) -> None:
        self._pool = pool
        self._history = history
        self._writes: GroupCommit[Draft, ChatMessage] = GroupCommit(
            self._store_and_announce, max_batch=max_batch, max_concurrent=writers
        )

    async def post(self, draft: Draft) -> ChatMessage:
        """Stores the message and its audit row, then announces it; returns once both are
        done. Messages posted at the same moment share one transaction and one Redis round
        trip (a group commit), which is what lets a busy room keep up."""
        return await self._writes.submit(draft)

    async def _store_and_announce(
        self, drafts: Sequence[Draft]
    ) -> list[ChatMessage | BaseException]:
        rows = [
            message_store.NewMessage(
                id=d.id,
                tenant_id=d.room.tenant_id,
                sender_id=d.sender_id,
                receiver_id=d.receiver_id,
                room_id=d.room.room_id,
                content=d.content,
            )
            for d in drafts
        ]
        async with self._pool.acquire() as conn:
            stored = await message_store.insert_many_audited(conn, rows, [d.audit for d in drafts])
        results: list[ChatMessage | BaseException] = []
        for draft, row in zip(drafts, rows, strict=True):
            sent_at = stored.get(draft.id)
            if sent_at is None:
                results.append(NotAMember(draft.room.name))
            else:
                results.append(
                    ChatMessage(
                        draft.id,
                        draft.room,
                        draft.sender_id,
                        row.receiver_id,
                        draft.content,
                        sent_at,
                    )
                )
        published = [
            (m, d.client_id)
            for m, d in zip(results, drafts, strict=True)
            if isinstance(m, ChatMessage)
        ]
        try:
            await self._history.publish_all(
                [event for m, client_id in published for event in self._events(m, client_id)]
            )
        except RedisError as exc:
            # stored is stored: the messages are in REST, only their live frames are lost
            log.warning("chat messages stored but not published", extra={"error": str(exc)})
        return results

    def _events(
        self, message: ChatMessage, client_id: str | None
    ) -> list[tuple[Feed, dict[str, Any]]]:
        room = message.room
        events = [(self._history.room_feed(room.tenant_id, room.name), message.event(client_id))]
        if message.receiver_id is not None:
            events.append(
                (
                    self._history.user_feed(room.tenant_id, message.receiver_id),
                    _new_message_event(message),
                )
            )
        return events

    async def open(self, tenant_id: str, name: str, user_id: str, *, admin: bool = False) -> Room:
        """The room `name` as `user_id` may use it; raises RoomNotFound or NotAMember.

        `admin` (a tenant administrator) may look at a group room without being in it, never
        at a 1-on-1 room of others."""
        pair = dm_members(name)
        if pair is not None:
            if user_id not in pair:
                raise NotAMember(name)
            return Room(tenant_id, name, None, pair)
        row = await room_store.get(self._pool, tenant_id, name)
        if row is None:
            raise RoomNotFound(name)
        if not admin and await room_store.role_of(self._pool, row.id, user_id) is None:
            raise NotAMember(name)
        return Room(tenant_id, name, row.id, None)

    async def insert_direct(
        self, conn: Conn, message_id: uuid.UUID, room: Room, sender_id: str, content: str
    ) -> ChatMessage:
        """Stores a 1-on-1 message in the caller's transaction (`POST /messages/send/` keeps
        its idempotency record there too); `announce` it after the commit."""
        receiver_id = room.peer_of(sender_id)
        assert receiver_id is not None, "a 1-on-1 room"
        sent_at: Any = await message_store.insert(
            conn, message_id, room.tenant_id, sender_id, receiver_id, content
        )
        return ChatMessage(message_id, room, sender_id, receiver_id, content, sent_at)

    async def announce(self, message: ChatMessage, client_id: str | None = None) -> None:
        """Publishes a committed message as `post` does: to the room and, for a 1-on-1
        message, to the receiver's notification feed, in one round trip."""
        await self._history.publish_all(self._events(message, client_id))

    async def mark_read(self, conn: Conn, room: Room, reader: str, up_to: uuid.UUID) -> bool:
        """Moves the reader's read marker to `up_to` (in the caller's transaction); False when
        nothing changed, so no receipt is due."""
        peer = room.peer_of(reader)
        if peer is not None:
            updated, _ = await message_store.mark_read(
                conn, room.tenant_id, reader, ids=None, from_user=peer, up_to=up_to
            )
            return updated > 0
        assert room.room_id is not None
        return await room_store.mark_read(conn, room.room_id, reader, up_to)

    async def announce_read(self, room: Room, reader: str, up_to: uuid.UUID) -> str:
        """A read receipt, recorded in the room's history so a reconnecting sender learns it."""
        return await self._history.publish_room(
            room.tenant_id,
            room.name,
            {"type": "read", "room": room.name, "user_id": reader, "up_to": str(up_to)},
        )

    async def typing(self, room: Room, user_id: str, typing: bool) -> None:
        await self._history.signal_room(
            room.tenant_id,
            room.name,
            {"type": "typing", "room": room.name, "user_id": user_id, "typing": typing},
        )

    async def removed(self, room: Room, user_id: str) -> None:
        """Tells the room (and the removed user's open sockets in it, which then close)."""
        await self._history.signal_room(room.tenant_id, room.name, removal_event(room, user_id))


# How every removal signal's payload begins: a chat socket asks it of every event it gets,
# so it looks at the first bytes only (a message's text is escaped in its JSON and cannot
# begin an event like this).
REMOVAL_PREFIX = dumps({"type": "member_removed"})[:-1] + b","


def removal_event(room: Room, user_id: str) -> dict[str, Any]:
    """The signal that `user_id` left `room` (its type first: see `REMOVAL_PREFIX`)."""
    return {"type": "member_removed", "room": room.name, "user_id": user_id}


def _new_message_event(message: ChatMessage) -> dict[str, Any]:
    """What the receiver's notification feed says about a new 1-on-1 message."""
    return {
        "type": "new_message",
        "room": message.room.name,
        "id": str(message.id),
        "sender_id": message.sender_id,
        "message": message.content,
        "sent_at": message.sent_at.isoformat(),
    }
