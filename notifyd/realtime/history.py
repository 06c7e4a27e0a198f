"""Feeds of live events (per user, per chat room): published to every instance and, for what a
reconnecting client must not miss, recorded in a capped history stream.

A recorded event is appended to the feed's capped stream and published in one atomic Lua step,
with the stream entry id as its `offset`. A client that reconnects with `?since=<offset>` gets
every later event from the stream, then the live ones; if the events after its offset were
already trimmed away (the stream is capped), it is told so and refetches over REST instead of
silently missing some. Signals (typing, presence) are published only: stale ones are worthless.

On the pub/sub channel every payload is framed as `<publish time, ms>|<event JSON>`: the hub
strips the stamp and measures fan-out latency from it, clients never see it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.payloads import dumps

# KEYS[1] history stream, KEYS[2] pub/sub channel;
# ARGV[1] max length, ARGV[2] JSON object, ARGV[3] publish time in ms.
RECORD_AND_PUBLISH = """
local offset = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[2])
local event = '{"offset":"' .. offset .. '",' .. string.sub(ARGV[2], 2)
redis.call('PUBLISH', KEYS[2], ARGV[3] .. '|' .. event)
return offset
"""


# The same for many events in one call: KEYS = stream, channel, stream, channel...;
# ARGV[1] max length, ARGV[2] publish time in ms, ARGV[3...] the events (one per key pair).
RECORD_AND_PUBLISH_MANY = """
local offsets = {}
for i = 3, #ARGV do
  local k = (i - 3) * 2 + 1
  local offset = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[i])
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
    gap: bool  # events after the client's offset were trimmed: refetch over REST


class History:
    def __init__(self, redis: Redis, keys: Keys, max_len: int) -> None:
        self._redis = redis
        self._keys = keys
        self._max_len = max_len
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
            keys=keys, args=[self._max_len, now_ms(), *(dumps(event) for _, event in events)]
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

    async def since(self, tenant_id: str, user_id: str, offset: str, limit: int) -> Missed:
        return await self._since(self._keys.user_history(tenant_id, user_id), offset, limit)

    async def since_in_room(self, tenant_id: str, room: str, offset: str, limit: int) -> Missed:
        return await self._since(self._keys.room_history(tenant_id, room), offset, limit)

    async def _record_and_publish(self, stream: str, channel: str, event: dict[str, Any]) -> str:
        offset: Any = await self._record(
            keys=[stream, channel], args=[self._max_len, dumps(event), now_ms()]
        )
        return offset.decode() if isinstance(offset, bytes) else str(offset)

    async def _since(self, key: str, offset: str, limit: int) -> Missed:
        entries: Any = await self._redis.xrange(key, min=f"({offset}", max="+", count=limit + 1)
        gap = len(entries) > limit
        if not gap and await self._redis.exists(key):
            info: Any = await self._redis.xinfo_stream(key)
            trimmed = int(info["entries-added"]) > int(info["length"])
            first = info.get("first-entry")
            # entries before the first retained one were trimmed; if the client's offset is
            # older than that, some of what it missed may be gone: tell it, do not guess
            gap = trimmed and first is not None and after(first[0].decode(), offset)
        events = []
        for entry_id, fields in entries[:limit]:
            offset_text = entry_id.decode()
            raw = fields[b"e"]
            events.append((offset_text, b'{"offset":"' + entry_id + b'",' + raw[1:]))
        return Missed(events, gap)
