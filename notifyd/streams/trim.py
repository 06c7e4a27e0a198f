"""Trimming what every consumer group has acknowledged.

An acknowledged entry stays in its stream: Redis deletes nothing on XACK, and the length cap
(`NOTIFYD_STREAM_MAX_LEN`, a million by default) exists only for a backlog gone wild. Until
then a busy stream holds every intent ever sent: hundreds of megabytes of Redis memory, all
of it rewritten on every AOF rewrite, for entries nobody will read again.

The trim point of a stream is the oldest entry some group may still need: for each group its
oldest pending entry, or (with nothing pending) its last delivered one; everything older has
been delivered to and acknowledged by every group. A group that has not read that far yet
keeps its entries, and so does a dead consumer's pending work. The script decides and trims
at once, so no read or acknowledgement interleaves. `MINID ~` removes whole nodes only
(cheap); the rest goes on a later pass.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

TRIM_ACKNOWLEDGED = """
local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if type(groups) ~= 'table' or groups.err or #groups == 0 then return 0 end
local floor, floor_ms, floor_seq
for _, group in ipairs(groups) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local bound = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    bound = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  local ms, seq = string.match(bound, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if floor == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor, floor_ms, floor_seq = bound, ms, seq
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', floor)
"""


class Trimmer:
    def __init__(self, redis: Redis, *, max_calls: int = 1000) -> None:
        """`max_calls` bounds one `trim_acknowledged`: Redis removes at most 10,000 entries
        a call with `~` (100 nodes), a few milliseconds each, between which other commands
        run; 1,000 calls is a backlog of ten million."""
        self._trim = redis.register_script(TRIM_ACKNOWLEDGED)
        self._max_calls = max_calls

    async def trim_acknowledged(self, stream: str) -> int:
        """Removes the entries of `stream` that every group has acknowledged; how many. A
        stream without groups (or not made yet) is left alone."""
        total = 0
        for _ in range(self._max_calls):
            removed: Any = await self._trim(keys=[stream])
            if not removed:
                break
            total += int(removed)
        return total
