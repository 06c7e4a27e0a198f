"""What the socket handlers may ask of the real-time actors, as protocols the actors meet.

The hub, presence and the socket seats are actors (each has a `run` the supervisor keeps
alive), and handlers never call actors (docs/architecture.md, "Layers"; the import-linter
contract in pyproject.toml checks it). A handler holds these ports instead: `http.context.
Services` types its fields with them and the composition root (`app.py`) fills them with the
actors themselves, so a call through a port is the very same method call, no wrapper on the
fan-out path. The values that cross (a room seat, a refusal) live here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from notifyd.realtime.subscriber import Subscriber


class Channels(Protocol):
    """The hub as a socket sees it: ref-counted pub/sub channels (`realtime.hub.Hub`)."""

    async def subscribe(self, channel: str, subscriber: Subscriber) -> None:
        """Returns once Redis confirmed the channel; events then reach `subscriber`."""
        ...

    async def unsubscribe(self, channel: str, subscriber: Subscriber) -> None: ...


@dataclass(frozen=True, slots=True)
class RoomSeat:
    """One open connection's place in a room's presence."""

    tenant_id: str
    room: str
    user_id: str
    connection_id: str


class RoomPresence(Protocol):
    """Who is in a room, as a chat socket sees it (`realtime.presence.Presence`)."""

    async def join(self, tenant_id: str, room: str, user_id: str) -> tuple[RoomSeat, list[str]]:
        """Takes a seat; returns it and who is online now (the caller included)."""
        ...

    async def leave(self, seat: RoomSeat) -> None: ...


class Seat:
    """One open socket's place under its caps, given back with `SocketSeats.release_soon`.

    Its number is unique in this instance; in Redis it is named with the instance's prefix
    (`SocketSeats.member`), so the string exists only while a Redis call needs it: every
    idle socket holds one of these."""

    __slots__ = ("number", "tenant_id", "user_id")

    def __init__(self, number: int, tenant_id: str, user_id: str) -> None:
        self.number = number
        self.tenant_id = tenant_id
        self.user_id = user_id


@dataclass(frozen=True, slots=True)
class SeatRefused:
    """Which socket cap is full: `limit` is sockets_user or sockets_tenant (the metric's
    label)."""

    limit: str
    detail: str


class SocketCaps(Protocol):
    """The socket caps, as a socket handler sees them (`realtime.seats.SocketSeats`)."""

    async def take(
        self, tenant_id: str, user_id: str, per_user: int, per_tenant: int
    ) -> Seat | SeatRefused:
        """A seat for a new socket, or which cap is full."""
        ...

    def release_soon(self, seat: Seat) -> None:
        """Gives a socket's seat back when the socket is done (without awaiting Redis)."""
        ...
