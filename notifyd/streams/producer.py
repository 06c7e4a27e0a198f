"""Every XADD goes through here, so one place bounds how long a stream may grow.

Streams are trimmed approximately (`MAXLEN ~`), which is cheap for Redis. Trimming can only
drop entries under an extreme backlog, and even then nothing is lost: PostgreSQL holds every
row, and the sweeper re-enqueues rows that did not move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

Fields = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes | str, bytes | str]


def _encodable(fields: Fields) -> dict[Any, Any]:
    """redis-py's XADD typing is invariant in its mapping; our field maps are all str/bytes."""
    return dict(fields.items())


# Many XADDs in one call: KEYS = the streams; ARGV[1] max length, then per entry the number
# of field pairs followed by the pairs.
XADD_MANY = """
local ids = {}
local a = 2
for i = 1, #KEYS do
  local pairs = tonumber(ARGV[a])
  local command = {'XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*'}
  for j = 1, pairs * 2 do command[#command + 1] = ARGV[a + j] end
  a = a + 1 + pairs * 2
  ids[i] = redis.call(unpack(command))
end
return ids
"""


class Producer:
    def __init__(self, redis: Redis, max_len: int) -> None:
        self._redis = redis
        self.max_len = max_len
        self._add_many = redis.register_script(XADD_MANY)

    async def add_many(self, entries: Sequence[tuple[str, Fields]]) -> None:
        """XADDs to (possibly different) streams in one script call: one command to encode
        and one round trip for a whole batch, each entry trimmed as `add` trims."""
        if not entries:
            return
        args: list[Any] = [self.max_len]
        for _, fields in entries:
            args.append(len(fields))
            for key, value in fields.items():
                args += (key, value)
        await self._add_many(keys=[stream for stream, _ in entries], args=args)

    async def add(self, stream: str, fields: Fields) -> bytes:
        entry_id: Any = await self._redis.xadd(
            stream, _encodable(fields), maxlen=self.max_len, approximate=True
        )
        return bytes(entry_id)

    def add_in(self, pipe: Pipeline, stream: str, fields: Fields) -> None:
        """The same XADD, queued on a pipeline (batched round trips)."""
        pipe.xadd(stream, _encodable(fields), maxlen=self.max_len, approximate=True)
