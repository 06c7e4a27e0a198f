"""Entries due later: a Redis sorted set scored by due time, moved to streams atomically.

One Lua script pops every due member and XADDs it to its stream in the same atomic step, so
with any number of instances running the timer each entry is moved exactly once, and a crash
cannot leave an entry both popped and not added. Delivery retries and reminders share the
wheel (one mechanism, not two); only the streams a move names go ahead of their time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis

from notifyd.payloads import dumps, loads

# KEYS[1] = the sorted set; ARGV[1] = now (epoch ms, fractional);
# ARGV[2] = most entries to move;
# ARGV[3] = the streams' approximate length bound (as every XADD of notifyd's);
# ARGV[4] = the horizon (epoch ms, >= now) up to which entries of the streams named in
# ARGV[5..] move ahead of their time; every other entry moves only once it is due.
# Returns {moved, the earliest entry left in the horizon or -1, the earliest beyond it or -1}:
# what the timer needs to know when to look again, read in the same atomic step.
MOVE_DUE = """
local now = tonumber(ARGV[1])
local ahead = {}
for i = 5, #ARGV do ahead[ARGV[i]] = true end
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[4], 'WITHSCORES',
                      'LIMIT', 0, tonumber(ARGV[2]))
local moved, waiting = 0, nil
for i = 1, #due, 2 do
  local member, score = due[i], tonumber(due[i + 1])
  local item = cjson.decode(member)
  if score <= now or ahead[item.s] then
    -- due_ms: which due time this entry is for, so a consumer can tell a stale one
    local args = {item.s, 'MAXLEN', '~', ARGV[3], '*', 'due_ms', due[i + 1]}
    for key, value in pairs(item.f) do
      table.insert(args, key)
      table.insert(args, value)
    end
    redis.call('XADD', unpack(args))
    redis.call('ZREM', KEYS[1], member)
    moved = moved + 1
  elseif waiting == nil then
    waiting = due[i + 1]
  end
end
local beyond = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[4], '+inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
return {moved, waiting or '-1', beyond[2] or '-1'}
"""


# KEYS[1] = the sorted set, KEYS[2] = the stream whose entries these replace;
# ARGV[1] = the consumer group, ARGV[2] = how many members follow, then that many
# (score, member) pairs, then the entry ids to acknowledge.
# The wheel entries and the acks of the stream entries they stand for, in one atomic step: an
# entry is never acked without its wheel entry stored, and a batch costs one round trip.
ADD_AND_ACK = """
local n = tonumber(ARGV[2])
if n > 0 then
  redis.call('ZADD', KEYS[1], unpack(ARGV, 3, 2 + 2 * n))
end
local acked = 0
if #ARGV > 2 + 2 * n then
  acked = redis.call('XACK', KEYS[2], ARGV[1], unpack(ARGV, 3 + 2 * n, #ARGV))
end
return acked
"""


@dataclass(frozen=True, slots=True)
class Scheduled:
    stream: str
    fields: dict[str, str]
    key: str  # makes the member unique: the same (stream, fields, key) is scheduled once


@dataclass(frozen=True, slots=True)
class Moved:
    """What one move did, and what is left: the timer's next wake-up is read from this."""

    moved: int
    waiting_ms: float | None  # the earliest entry within the horizon left for its own time
    beyond_ms: float | None  # the earliest entry beyond the horizon


def _member(item: Scheduled) -> bytes:
    return dumps({"s": item.stream, "f": dict(sorted(item.fields.items())), "k": item.key})


class Schedule:
    def __init__(self, redis: Redis, key: str, stream_max_len: int = 1_000_000) -> None:
        self._redis = redis
        self._key = key
        self._stream_max_len = stream_max_len
        self._move = redis.register_script(MOVE_DUE)
        self._add_and_ack = redis.register_script(ADD_AND_ACK)
        # set when this process schedules something: the timer re-reads the earliest due
        # time at once instead of finishing a sleep computed before it existed (unless what
        # was added is due later than that sleep ends: `take_earliest_added`)
        self.changed = asyncio.Event()
        self._earliest_added_ms: float | None = None

    async def add(self, item: Scheduled, due: datetime, *, only_new: bool = False) -> None:
        """Schedule (or move) `item` to `due`; `only_new` keeps an existing due time."""
        score = due.timestamp() * 1000
        await self._redis.zadd(self._key, {_member(item): score}, nx=only_new)
        self._added(score)

    async def add_many(
        self, items: list[tuple[Scheduled, datetime]], *, only_new: bool = False
    ) -> None:
        """Many at once, one round trip (rebuilding the wheel from PostgreSQL)."""
        if not items:
            return
        scores = {_member(item): due.timestamp() * 1000 for item, due in items}
        await self._redis.zadd(self._key, scores, nx=only_new)
        self._added(min(scores.values()))

    async def add_many_acking(
        self, items: list[tuple[Scheduled, datetime]], stream: str, group: str, ids: list[bytes]
    ) -> int:
        """`add_many`, and XACK of `ids` in `stream`'s `group` in the same atomic step (one
        round trip): for stream entries whose work the wheel now holds. Returns how many
        were acked (an id already acked, or taken over and acked by a peer, counts 0)."""
        if not items and not ids:
            return 0
        args: list[bytes | str | float] = [group, len(items)]
        for item, due in items:
            args += [due.timestamp() * 1000, _member(item)]
        args += ids
        acked: Any = await self._add_and_ack(keys=[self._key, stream], args=args)
        if items:
            self._added(min(due.timestamp() * 1000 for _, due in items))
        return int(acked)

    def _added(self, earliest_ms: float) -> None:
        if self._earliest_added_ms is None or earliest_ms < self._earliest_added_ms:
            self._earliest_added_ms = earliest_ms
        self.changed.set()

    def take_earliest_added(self) -> float | None:
        """The earliest due time (epoch ms) this process scheduled since the last call, and
        forget it (None: nothing scheduled meanwhile)."""
        earliest, self._earliest_added_ms = self._earliest_added_ms, None
        return earliest

    async def remove(self, item: Scheduled) -> bool:
        return bool(await self._redis.zrem(self._key, _member(item)))

    async def move_due(self, now: datetime, limit: int = 500) -> int:
        """Move what is due to its streams; returns how many moved."""
        return (await self.move(now, limit)).moved

    async def move(
        self,
        now: datetime,
        limit: int = 500,
        *,
        horizon: datetime | None = None,
        ahead: frozenset[str] = frozenset(),
    ) -> Moved:
        """Move what is due, and the entries of the `ahead` streams due before `horizon`.

        Only the streams that asked for it move early: a delivery retry keeps its time,
        which may be a provider's Retry-After that a send must not come before.
        """
        # exact (fractional) ms: rounded down, an entry due within the current millisecond
        # would be left waiting and the timer would spin on it until the next one
        now_ms = now.timestamp() * 1000
        horizon_ms = max(now_ms, horizon.timestamp() * 1000) if horizon else now_ms
        reply: Any = await self._move(
            keys=[self._key],
            args=[now_ms, limit, self._stream_max_len, horizon_ms, *sorted(ahead)],
        )
        moved, waiting, beyond = int(reply[0]), float(reply[1]), float(reply[2])
        return Moved(moved, waiting if waiting >= 0 else None, beyond if beyond >= 0 else None)

    async def next_due_ms(self) -> float | None:
        first: Any = await self._redis.zrange(self._key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def pending(self) -> list[tuple[Scheduled, float]]:
        """Everything scheduled, for tests and the operator CLI."""
        rows: Any = await self._redis.zrange(self._key, 0, -1, withscores=True)
        items = []
        for member, score in rows:
            data = loads(member)
            items.append((Scheduled(data["s"], data["f"], data["k"]), float(score)))
        return items
