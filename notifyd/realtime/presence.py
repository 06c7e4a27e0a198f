"""Who of a room is online, correct across instances and across instance crashes.

Per room, three Redis keys under `Keys.presence(...)`:
- `:conns`, a sorted set of connection ids scored by when they expire,
- `:who`, connection id -> user id,
- `:users`, user id -> how many of that user's connections are live.

A user *joins* when their count goes 0 -> 1 and *leaves* when it goes back to 0, so a second
tab does not announce anything. Each Lua step changes the keys and publishes the join or
leave in one atomic go, so two instances never both announce the same transition.

Every instance refreshes the expiry of its own connections (the `Presence` actor). A crashed
instance stops refreshing; its connections expire and the next sweep (on a join or on any
instance's refresh of that room) announces those users' departure.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from typing import Any

from redis.asyncio import Redis

from notifyd.keys import Keys
from notifyd.realtime.history import now_ms
from notifyd.realtime.ports import RoomSeat
from notifyd.supervisor import sleep_or_stop

# Removes connection ARGV[i] (for i in the given list); returns the users whose last connection
# that was. Shared by the scripts below, which all take the same first four KEYS:
# KEYS[1] conns, KEYS[2] who, KEYS[3] users, KEYS[4] the room's pub/sub channel.
_DROP = """
local function drop(conns, room, stamp)
  for _, conn in ipairs(conns) do
    if redis.call('ZREM', KEYS[1], conn) == 1 then
      local user = redis.call('HGET', KEYS[2], conn)
      redis.call('HDEL', KEYS[2], conn)
      if user and redis.call('HINCRBY', KEYS[3], user, -1) <= 0 then
        redis.call('HDEL', KEYS[3], user)
        local event = cjson.encode({type = 'leave', room = room, user_id = user})
        redis.call('PUBLISH', KEYS[4], stamp .. '|' .. event)
      end
    end
  end
end
"""

# ARGV: now ms, room, connection id, user id, expiry ms, key ttl ms
JOIN = (
    _DROP
    + """
drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]), ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
if redis.call('HINCRBY', KEYS[3], ARGV[4], 1) == 1 then
  local event = cjson.encode({type = 'join', room = ARGV[2], user_id = ARGV[4]})
  redis.call('PUBLISH', KEYS[4], ARGV[1] .. '|' .. event)
end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[6]) end
return redis.call('HKEYS', KEYS[3])
"""
)

# ARGV: now ms, room, connection id
LEAVE = _DROP + "drop({ARGV[3]}, ARGV[2], ARGV[1])\nreturn 0\n"

# ARGV: now ms, room, expiry ms, key ttl ms, connection ids... (this instance's, still open)
REFRESH = (
    _DROP
    + """
drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]), ARGV[2], ARGV[1])
for i = 5, #ARGV do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[i]) end
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 0
"""
)


class Presence:
    """Joins and leaves of this instance's connections; an actor that keeps them alive."""

    name = "presence"

    def __init__(self, redis: Redis, keys: Keys, ttl: float) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_ms = int(ttl * 1000)
        self._join = redis.register_script(JOIN)
        self._leave = redis.register_script(LEAVE)
        self._refresh = redis.register_script(REFRESH)
        self._seats: dict[tuple[str, str], set[str]] = defaultdict(set)

    def _room_keys(self, tenant_id: str, room: str) -> list[str]:
        prefix = self._keys.presence(tenant_id, room)
        return [
            f"{prefix}:conns",
            f"{prefix}:who",
            f"{prefix}:users",
            self._keys.room_events(tenant_id, room),
        ]

    async def join(self, tenant_id: str, room: str, user_id: str) -> tuple[RoomSeat, list[str]]:
        """Takes a seat; returns it and who is online now (the caller included)."""
        seat = RoomSeat(tenant_id, room, user_id, uuid.uuid4().hex)
        now = now_ms()
        online: Any = await self._join(
            keys=self._room_keys(tenant_id, room),
            args=[now, room, seat.connection_id, user_id, now + self._ttl_ms, 2 * self._ttl_ms],
        )
        self._seats[(tenant_id, room)].add(seat.connection_id)
        return seat, sorted(u.decode() if isinstance(u, bytes) else str(u) for u in online)

    async def leave(self, seat: RoomSeat) -> None:
        seats = self._seats.get((seat.tenant_id, seat.room))
        if seats is not None:
            seats.discard(seat.connection_id)
            if not seats:
                del self._seats[(seat.tenant_id, seat.room)]
        await self._leave(
            keys=self._room_keys(seat.tenant_id, seat.room),
            args=[now_ms(), seat.room, seat.connection_id],
        )

    async def refresh(self) -> None:
        """Pushes the expiry of every local connection forward and sweeps the expired ones."""
        now = now_ms()
        for (tenant_id, room), seats in list(self._seats.items()):
            await self._refresh(
                keys=self._room_keys(tenant_id, room),
                args=[now, room, now + self._ttl_ms, 2 * self._ttl_ms, *seats],
            )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            if await sleep_or_stop(stop, self._ttl_ms / 3000):
                return
