"""Stream stats: measures stream length, and pending and lag per consumer group, for /metrics.

prometheus_client collects synchronously while Redis is only reachable asynchronously, so a
scrape cannot ask Redis itself; this actor refreshes gauges every
NOTIFYD_STREAM_STATS_INTERVAL instead (one pipelined round trip). It is its own actor, not
part of the housekeeper, so a long idempotency purge never leaves the gauges stale. Every
instance reports the same Redis-wide numbers: aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from prometheus_client import Gauge
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.metrics import Metrics
from notifyd.supervisor import sleep_or_stop


class StreamStats:
    name = "stream_stats"

    def __init__(
        self,
        redis: Redis,
        metrics: Metrics,
        *,
        groups: list[tuple[str, str]],
        streams: list[str],
        interval: float,
    ) -> None:
        """`groups`: every (stream, group) notifyd consumes; `streams`: more streams to
        measure by length only (the dead letters, which no group reads)."""
        self._redis = redis
        self._metrics = metrics
        self._groups = groups
        self._streams = list(dict.fromkeys([*(stream for stream, _ in groups), *streams]))
        self._interval = interval

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.refresh()
            if await sleep_or_stop(stop, self._interval):
                return

    async def refresh(self) -> None:
        grouped = list(dict.fromkeys(stream for stream, _ in self._groups))
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xlen(stream)
            for stream in grouped:
                pipe.xinfo_groups(stream)
            # a stream not made yet answers XINFO GROUPS with an error, in its own slot
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        lengths, infos = replies[: len(self._streams)], replies[len(self._streams) :]
        for stream, length in zip(self._streams, lengths, strict=True):
            _raise_unless_reply_error(length)
            if isinstance(length, int):
                self._metrics.stream_length.labels(stream).set(length)
        by_stream = dict(zip(grouped, infos, strict=True))
        for stream, group in self._groups:
            info = by_stream[stream]
            _raise_unless_reply_error(info)
            found = _group(info, group) if isinstance(info, list) else None
            self._set(stream, group, found)

    def _set(self, stream: str, group: str, info: dict[Any, Any] | None) -> None:
        """An unknown number is no series at all: a stale or made-up one would mislead."""
        pending, lag = self._metrics.stream_pending, self._metrics.stream_lag
        if info is None:
            _forget(pending, stream, group)
            _forget(lag, stream, group)
            return
        pending.labels(stream, group).set(int(info["pending"]))
        if info.get("lag") is None:  # Redis cannot tell after deletions inside the range
            _forget(lag, stream, group)
        else:
            lag.labels(stream, group).set(int(info["lag"]))


def _raise_unless_reply_error(reply: Any) -> None:
    """A command's own error (no such stream yet) only leaves its number unknown; anything
    else (the connection) is raised, and the supervisor restarts this actor with backoff."""
    if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
        raise reply


def _group(infos: list[dict[Any, Any]], group: str) -> dict[Any, Any] | None:
    for info in infos:
        name = info["name"]
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return info
    return None


def _forget(gauge: Gauge, stream: str, group: str) -> None:
    with contextlib.suppress(KeyError):  # never set: nothing to forget
        gauge.remove(stream, group)
