"""Every XADD goes through here, so one place bounds how long a stream may grow.

Streams are trimmed approximately (`MAXLEN ~`), which is cheap for Redis. Trimming can only
drop entries under an extreme backlog, and even then nothing is lost: PostgreSQL holds every
row, and the sweeper re-enqueues rows that did not move.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

Fields = Mapping[str, str] | Mapping[str, bytes] | Mapping[bytes | str, bytes | str]


def _encodable(fields: Fields) -> dict[Any, Any]:
    """redis-py's XADD typing is invariant in its mapping; our field maps are all str/bytes."""
    return dict(fields.items())


class Producer:
    def __init__(self, redis: Redis, max_len: int) -> None:
        self._redis = redis
        self.max_len = max_len

    async def add(self, stream: str, fields: Fields) -> bytes:
        entry_id: Any = await self._redis.xadd(
            stream, _encodable(fields), maxlen=self.max_len, approximate=True
        )
        return bytes(entry_id)

    def pipeline(self) -> Pipeline:
        """A non-transactional pipeline for `add_in` (use as `async with`)."""
        return self._redis.pipeline(transaction=False)

    def add_in(self, pipe: Pipeline, stream: str, fields: Fields) -> None:
        """The same XADD, queued on a pipeline (batched round trips)."""
        pipe.xadd(stream, _encodable(fields), maxlen=self.max_len, approximate=True)
