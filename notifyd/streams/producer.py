"""Every XADD goes through here, so one place bounds how long a stream may grow.

Streams are trimmed approximately (`MAXLEN ~`), which is cheap for Redis. Trimming can only
drop entries under an extreme backlog, and even then nothing is lost: PostgreSQL holds every
row, and the sweeper re-enqueues rows that did not move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

Fields = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes | str, bytes | str]


def _encodable(fields: Fields) -> dict[Any, Any]:
    """redis-py's XADD typing is invariant in its mapping; our field maps are all str/bytes."""
    return dict(fields.items())


# Many XADDs in one call. KEYS = the distinct streams; ARGV[1] the max length, ARGV[2] a JSON
# array with one array per entry: the index of its stream in KEYS, then its field/value pairs.
# One JSON argument rather than one argument per field: redis-py packs each argument in
# Python (a batch of 64 intents had hundreds), cjson decodes the lot in C.
XADD_MANY = """
local entries = cjson.decode(ARGV[2])
local ids = {}
for i, entry in ipairs(entries) do
  local command = {'XADD', KEYS[entry[1]], 'MAXLEN', '~', ARGV[1], '*'}
  for j = 2, #entry do command[#command + 1] = entry[j] end
  ids[i] = redis.call(unpack(command))
end
return ids
"""


class Producer:
    def __init__(self, redis: Redis, max_len: int) -> None:
        self._redis = redis
        self.max_len = max_len
        self._add_many = redis.register_script(XADD_MANY)

    async def add_many(self, entries: Sequence[tuple[str, Mapping[str, str]]]) -> None:
        """XADDs to (possibly different) streams in one script call: one command to encode
        and one round trip for a whole batch, each entry trimmed as `add` trims. Text fields
        only (they travel as JSON), which is what our payloads' `to_fields` make."""
        if not entries:
            return
        streams: dict[str, int] = {}
        encoded: list[list[Any]] = []
        for stream, fields in entries:
            index = streams.setdefault(stream, len(streams) + 1)  # Lua counts from 1
            entry: list[Any] = [index]
            for pair in fields.items():
                entry += pair
            encoded.append(entry)
        await self._add_many(keys=list(streams), args=[self.max_len, orjson.dumps(encoded)])

    async def add(self, stream: str, fields: Fields) -> bytes:
        entry_id: Any = await self._redis.xadd(
            stream, _encodable(fields), maxlen=self.max_len, approximate=True
        )
        return bytes(entry_id)

    def add_in(self, pipe: Pipeline, stream: str, fields: Fields) -> None:
        """The same XADD, queued on a pipeline (batched round trips)."""
        pipe.xadd(stream, _encodable(fields), maxlen=self.max_len, approximate=True)
