"""A socket's side of the hub: its bounded queue, then direct writes of ready-made frames.

Apart from the hub (`realtime.hub`, an actor) so the socket handlers can hold a `Subscriber`
without importing the actor: handlers never call actors (docs/architecture.md, "Layers"); they
reach the hub through `realtime.ports.Channels`, which the composition root fills with it.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Protocol

# why the hub ends a socket: (close code, reason); the socket's owner closes it
TOO_SLOW = (4008, b"too slow: events were not read in time")
REMOVED = (4003, b"no longer a member of this room")
Ending = Callable[[int, bytes], None]


class Socket(Protocol):
    """What the hub needs of a WebSocket: whether it has begun closing."""

    @property
    def closed(self) -> bool: ...


def text_frame(payload: bytes) -> bytes:
    """A complete server-to-client WebSocket text frame (RFC 6455: FIN, opcode 1, unmasked,
    uncompressed). Built once per event and written to every socket that wants it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class Subscriber:
    """One socket's view of the hub.

    It starts *queued*: events wait in a bounded queue while the socket replays history;
    then the socket sends them in order (`drain`) and switches it to *direct*: the hub
    writes each event's ready-made frame straight to the socket's transport, so an event for
    a room of many is encoded once and costs one write per member, with no task switch and
    no task per socket. Either way a client that does not read is cut off: a full queue, or
    more than `max_buffer` bytes waiting in the transport, and `end` is called to close it.
    """

    __slots__ = (
        "_end",
        "_max_buffer",
        "_pending",
        "_queued",
        "_size",
        "_socket",
        "_transport",
        "_watch",
        "overflowed",
    )

    def __init__(self, size: int, max_buffer: int = 1 << 20, end: Ending | None = None) -> None:
        self._size = size
        self._queued: deque[bytes] | None = deque()
        self.overflowed = False
        self._max_buffer = max_buffer
        self._end = end
        self._transport: asyncio.WriteTransport | None = None
        self._socket: Socket | None = None
        self._watch: Callable[[bytes], bool] | None = None
        self._pending: list[bytes] = []

    @property
    def direct(self) -> bool:
        return self._transport is not None

    @property
    def queued(self) -> int:
        """Events waiting in the catch-up queue (at most the queue's size; none once the
        socket is direct or cut off). With `buffered`, what this socket holds in the daemon:
        read by the tests of the bounds, never on the hub's path."""
        return len(self._queued) if self._queued else 0

    @property
    def buffered(self) -> int:
        """Bytes of frames written to the socket's transport that the client has not taken
        yet (none before the socket goes direct, and none the hub adds once it is cut off)."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def take_queued(self) -> bytes | None:
        """The oldest event still queued, or None when caught up."""
        return self._queued.popleft() if self._queued else None

    def go_direct(
        self,
        transport: asyncio.WriteTransport,
        socket: Socket,
        watch: Callable[[bytes], bool] | None = None,
    ) -> None:
        """From now on frames go straight to `transport` (call when `take_queued` has just
        returned None, with no await since, so the order of events is kept). `watch` picks
        events after which the socket must end, such as "you were removed from this room";
        `socket.closed` says when the socket stopped sending."""
        self._queued = None
        self._transport = transport
        self._socket = socket
        self._watch = watch

    def offer(self, payload: bytes, frame: bytes | None = None) -> bool:
        """Queues the event, or (direct) adds its frame to what `flush` writes next."""
        if self.overflowed:
            return False
        if self._transport is None:
            if self._queued is None or len(self._queued) >= self._size:
                self._overflow()
                return False
            self._queued.append(payload)
            return True
        if self._socket is not None and self._socket.closed:
            return False
        self._pending.append(frame if frame is not None else text_frame(payload))
        if self._watch is not None and self._watch(payload):
            self.flush()  # the client sees the event before its socket is closed
            self._transport = None
            if self._end is not None:
                self._end(*REMOVED)
        return True

    def flush(self) -> None:
        """Writes the frames gathered since the last flush in one go: one syscall for all
        the events of a burst, not one per event."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._socket is not None and self._socket.closed:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._max_buffer:
            self._overflow()

    def _overflow(self) -> None:
        self.overflowed = True
        self._transport = None  # not one more byte to a client that does not read
        self._pending.clear()
        self._queued = None
        if self._end is not None:
            self._end(*TOO_SLOW)
