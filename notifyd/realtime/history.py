"""Feeds of live events (per user, per chat room): published to every instance and, for what a
reconnecting client must not miss, recorded in a capped history stream.

A recorded event is appended to the feed's capped stream and published in one atomic Lua step,
with the stream entry id as its `offset`; the same step pushes the stream's expiry forward
(`NOTIFYD_WS_HISTORY_TTL`), so a feed nobody writes to any more (a user gone, an id made up)
leaves Redis after that period instead of staying forever. A client that reconnects with
`?since=<offset>` gets the later events from the stream, then the live ones. It is told to
refetch over REST (a `gap`) instead of silently missing some when events after its offset are
no longer kept (trimmed by the cap, or the whole stream expired and maybe began again), and
when more were missed than one replay carries (`NOTIFYD_WS_REPLAY_MAX_ENTRIES` / `_BYTES`):
the replay then holds the newest of them, and the gap names the first one it holds.
Signals (typing, presence) are published only: stale ones are worthless.

On the pub/sub channel every payload is framed as `<publish time, ms>|<event JSON>`: the hub
strips the stamp and measures fan-out latency from it, clients never see it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.keys import Keys
from notifyd.payloads import dumps

# KEYS[1] history stream, KEYS[2] pub/sub channel;
# ARGV[1] max length, ARGV[2] JSON object, ARGV[3] publish time in ms, ARGV[4] expiry in ms.
RECORD_AND_PUBLISH = """
local offset = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local event = '{"offset":"' .. offset .. '",' .. string.sub(ARGV[2], 2)
redis.call('PUBLISH', KEYS[2], ARGV[3] .. '|' .. event)
return offset
"""


# The same for many events in one call: KEYS = stream, channel, stream, channel...;
# ARGV[1] max length, ARGV[2] publish time in ms, ARGV[3] expiry in ms,
# ARGV[4...] the events (one per key pair).
RECORD_AND_PUBLISH_MANY = """
local offsets = {}
for i = 4, #ARGV do
  local k = (i - 4) * 2 + 1
  local offset = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
  redis.call('PEXPIRE', KEYS[k], ARGV[3])
  local event = '{"offset":"' .. offset .. '",' .. string.sub(ARGV[i], 2)
  redis.call('PUBLISH', KEYS[k + 1], ARGV[2] .. '|' .. event)
  offsets[#offsets + 1] = offset
end
return offsets
"""


def now_ms() -> int:
    return int(time.time() * 1000)


def framed(event: bytes) -> bytes:
    """A pub/sub payload: the publish time stamp, then the event as clients receive it."""
    return b"%d|%s" % (now_ms(), event)


def _id(offset: str) -> tuple[int, int]:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


def is_offset(text: str) -> bool:
    try:
        _id(text)
    except ValueError:
        return False
    return True


def after(offset: str, other: str) -> bool:
    """Whether stream id `offset` comes after `other`."""
    return _id(offset) > _id(other)


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class Feed:
    """Where one feed's events go: its capped history stream and its pub/sub channel."""

    stream: str
    channel: str


@dataclass(frozen=True, slots=True)
class Missed:
    events: list[tuple[str, bytes]]  # (offset, the event as published, offset included)
    gap: bool  # some events after the client's offset are not among them: refetch over REST
    # with a gap: the first offset the replay holds (what lies between the client's offset
    # and this one must be refetched); None when it holds nothing
    until: str | None = None


@dataclass(frozen=True, slots=True)
class Bounds:
    """How long a feed is kept after its last event, and how much one replay carries."""

    max_len: int  # entries kept per feed (MAXLEN ~)
    ttl: float  # seconds a feed is kept after its last recorded event
    replay_entries: int  # events one `?since=` replay sends at most
    replay_bytes: int  # bytes of events one replay sends (and the daemon holds) at most


# A replay reads the stream newest first, this many entries a command at most, and stops at
# its bounds: a stream of large events is never loaded whole into the daemon.
REPLAY_PAGE = 64


class History:
    def __init__(self, redis: Redis, keys: Keys, bounds: Bounds) -> None:
        self._redis = redis
        self._keys = keys
        self._max_len = bounds.max_len
        self._ttl_ms = max(1, int(bounds.ttl * 1000))
        self._replay_entries = bounds.replay_entries
        self._replay_bytes = bounds.replay_bytes
        self._record = redis.register_script(RECORD_AND_PUBLISH)
        self._record_many = redis.register_script(RECORD_AND_PUBLISH_MANY)

    def user_feed(self, tenant_id: str, user_id: str) -> Feed:
        return Feed(
            self._keys.user_history(tenant_id, user_id), self._keys.user_events(tenant_id, user_id)
        )

    def room_feed(self, tenant_id: str, room: str) -> Feed:
        return Feed(
            self._keys.room_history(tenant_id, room), self._keys.room_events(tenant_id, room)
        )

    async def publish_all(self, events: Sequence[tuple[Feed, dict[str, Any]]]) -> list[str]:
        """Records and publishes many events in one script call (one command to encode, one
        round trip); their offsets."""
        if not events:
            return []
        keys: list[str] = []
        for feed, _ in events:
            keys += (feed.stream, feed.channel)
        offsets: Any = await self._record_many(
            keys=keys,
            args=[self._max_len, now_ms(), self._ttl_ms, *(dumps(event) for _, event in events)],
        )
        return [o.decode() if isinstance(o, bytes) else str(o) for o in offsets]

    async def publish_to_users(
        self, events: Sequence[tuple[str, str, dict[str, Any]]]
    ) -> list[str]:
        """(tenant, user, event) each recorded and published on that user's feed, in one
        round trip; their offsets."""
        return await self.publish_all([(self.user_feed(t, u), e) for t, u, e in events])

    async def publish(self, tenant_id: str, user_id: str, event: dict[str, Any]) -> str:
        """Record and publish `event` (a JSON object) on a user's feed; returns its offset."""
        return await self._record_and_publish(
            self._keys.user_history(tenant_id, user_id),
            self._keys.user_events(tenant_id, user_id),
            event,
        )

    async def publish_room(self, tenant_id: str, room: str, event: dict[str, Any]) -> str:
        """Record and publish `event` on a chat room's feed; returns its offset."""
        return await self._record_and_publish(
            self._keys.room_history(tenant_id, room), self._keys.room_events(tenant_id, room), event
        )

    async def signal_user(self, tenant_id: str, user_id: str, event: dict[str, Any]) -> None:
        """Publish without recording: only sockets open now care (e.g. a new unread count)."""
        await self._redis.publish(self._keys.user_events(tenant_id, user_id), framed(dumps(event)))

    async def signal_room(self, tenant_id: str, room: str, event: dict[str, Any]) -> None:
        """Publish without recording: typing indicators, membership changes."""
        await self._redis.publish(self._keys.room_events(tenant_id, room), framed(dumps(event)))

    async def since(self, tenant_id: str, user_id: str, offset: str) -> Missed:
        return await self._since(self._keys.user_history(tenant_id, user_id), offset)

    async def since_in_room(self, tenant_id: str, room: str, offset: str) -> Missed:
        return await self._since(self._keys.room_history(tenant_id, room), offset)

    async def _record_and_publish(self, stream: str, channel: str, event: dict[str, Any]) -> str:
        offset: Any = await self._record(
            keys=[stream, channel], args=[self._max_len, dumps(event), now_ms(), self._ttl_ms]
        )
        return offset.decode() if isinstance(offset, bytes) else str(offset)

    async def _since(self, key: str, offset: str) -> Missed:
        """The events after `offset`, oldest first: the newest of them when there are more
        than the replay's bounds (a gap), read newest first a page at a time."""
        newest_first: list[tuple[bytes, bytes]] = []
        size = 0
        upper = "+"
        cut = False
        while not cut:
            count = min(REPLAY_PAGE, self._replay_entries - len(newest_first) + 1)
            page: Any = await self._redis.xrevrange(key, max=upper, min=f"({offset}", count=count)
            for entry_id, fields in page:
                raw = fields[b"e"]
                if len(newest_first) == self._replay_entries or size + len(raw) > (
                    self._replay_bytes
                ):
                    cut = True  # more than one replay carries: the client refetches the rest
                    break
                newest_first.append((entry_id, raw))
                size += len(raw)
            if len(page) < count:
                break
            upper = f"({page[-1][0].decode()}"
        events = [
            (entry_id.decode(), b'{"offset":"' + entry_id + b'",' + raw[1:])
            for entry_id, raw in reversed(newest_first)
        ]
        gap = cut or await self._lost_after(key, offset)
        return Missed(events, gap, events[0][0] if gap and events else None)

    async def _lost_after(self, key: str, offset: str) -> bool:
        """Whether events after `offset` may be gone from the stream.

        An offset is an entry the client saw on this stream. If the oldest entry kept is
        younger, that entry was removed: trimmed by the cap, or the stream expired (and
        maybe began again with a later event), and what followed it may be gone too. An
        expired stream is no stream at all: a client with a real offset refetches, never
        gets silently nothing. `0` (or `0-0`) asks for everything kept: a gap only if the
        stream was ever trimmed."""
        beginning = _id(offset) == (0, 0)
        try:
            info: Any = await self._redis.xinfo_stream(key)
        except ResponseError:  # no such key: never written, or expired
            return not beginning
        first = info.get("first-entry")
        if first is None:  # an empty stream: everything it had is gone
            return not beginning
        trimmed = int(info["entries-added"]) > int(info["length"])
        return after(first[0].decode(), offset) and (trimmed or not beginning)
