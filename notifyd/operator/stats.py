"""`notifyd stats`: where the work is, read straight from Redis and PostgreSQL.

`/metrics` answers the same questions over time (the stream_stats actor), but only while a
daemon runs; an operator looking at a stuck deployment needs the numbers from the servers
themselves: each stream's length, each consumer group's consumers, pending entries and lag
(Redis 7's XINFO GROUPS `lag`; None when Redis cannot tell, after deletions inside the
range), the timer wheel's size and next due time, the dead letters, and the notification
rows by status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.keys import Keys
from notifyd.operator import connect
from notifyd.operator.output import from_ms, iso, print_json, table
from notifyd.settings import Settings
from notifyd.store.pool import Executor

BY_STATUS = "SELECT status, count(*) AS n FROM notifications GROUP BY status ORDER BY status"


@dataclass(frozen=True, slots=True)
class GroupStats:
    name: str
    consumers: int
    pending: int
    lag: int | None
    last_delivered_id: str
    entries_read: int | None


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream: str
    length: int
    groups: list[GroupStats]


@dataclass(frozen=True, slots=True)
class TimerStats:
    key: str
    size: int
    next_due: datetime | None


@dataclass(frozen=True, slots=True)
class Stats:
    taken_at: datetime
    streams: list[StreamStats]
    timer: TimerStats
    dead_letters: int
    notifications: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        next_due = self.timer.next_due
        return {
            "taken_at": iso(self.taken_at),
            "streams": [
                {
                    "stream": s.stream,
                    "length": s.length,
                    "groups": [
                        {
                            "group": g.name,
                            "consumers": g.consumers,
                            "pending": g.pending,
                            "lag": g.lag,
                            "last_delivered_id": g.last_delivered_id,
                            "entries_read": g.entries_read,
                        }
                        for g in s.groups
                    ],
                }
                for s in self.streams
            ],
            "timer": {
                "key": self.timer.key,
                "size": self.timer.size,
                "next_due": iso(next_due),
                "next_due_in_s": _seconds_until(next_due, self.taken_at),
            },
            "dead_letters": self.dead_letters,
            "notifications": {
                "by_status": self.notifications,
                "total": sum(self.notifications.values()),
            },
        }


def _seconds_until(when: datetime | None, now: datetime) -> float | None:
    return None if when is None else round((when - now).total_seconds(), 3)


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _group(info: dict[Any, Any]) -> GroupStats:
    return GroupStats(
        name=_str(info["name"]),
        consumers=int(info["consumers"]),
        pending=int(info["pending"]),
        lag=_optional_int(info.get("lag")),
        last_delivered_id=_str(info["last-delivered-id"]),
        entries_read=_optional_int(info.get("entries-read")),
    )


def streams_of(keys: Keys) -> list[str]:
    """Every stream notifyd consumes, then the dead letters (which no group reads)."""
    return list(dict.fromkeys([*(s for s, _ in keys.consumer_groups()), keys.dead_letters]))


async def redis_stats(redis: Redis, keys: Keys) -> tuple[list[StreamStats], TimerStats]:
    streams = streams_of(keys)
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        pipe.zcard(keys.timer)
        pipe.zrange(keys.timer, 0, 0, withscores=True)
        # a stream not made yet answers XINFO GROUPS with an error, in its own slot
        replies: list[Any] = await pipe.execute(raise_on_error=False)
    found: list[StreamStats] = []
    for index, stream in enumerate(streams):
        length, infos = replies[2 * index], replies[2 * index + 1]
        for reply in (length, infos):
            if isinstance(reply, Exception) and not isinstance(reply, ResponseError):
                raise reply
        groups = [_group(info) for info in infos] if isinstance(infos, list) else []
        found.append(StreamStats(stream, int(length), groups))
    size, first = replies[-2], replies[-1]
    next_due = from_ms(float(first[0][1])) if first else None
    return found, TimerStats(keys.timer, int(size), next_due)


async def notifications_by_status(executor: Executor) -> dict[str, int]:
    return {r["status"]: int(r["n"]) for r in await executor.fetch(BY_STATUS)}


async def collect(settings: Settings) -> Stats:
    keys = Keys(settings.redis_prefix)
    async with connect.redis(settings) as redis, connect.postgres(settings) as pool:
        streams, timer = await redis_stats(redis, keys)
        by_status = await notifications_by_status(pool)
    dead = next(s.length for s in streams if s.stream == keys.dead_letters)
    return Stats(datetime.now(UTC), streams, timer, dead, by_status)


def render(stats: Stats) -> str:
    rows: list[tuple[object, ...]] = []
    for s in stats.streams:
        if not s.groups:
            rows.append((s.stream, s.length, None, None, None, None))
        for g in s.groups:
            lag = "?" if g.lag is None else g.lag
            rows.append((s.stream, s.length, g.name, g.consumers, g.pending, lag))
    lines = [table(("STREAM", "LENGTH", "GROUP", "CONSUMERS", "PENDING", "LAG"), rows), ""]
    timer = stats.timer
    if timer.next_due is None:
        lines.append(f"timer {timer.key}: {timer.size} entries")
    else:
        seconds = _seconds_until(timer.next_due, stats.taken_at) or 0.0
        when = f"in {seconds:.1f} s" if seconds >= 0 else f"{-seconds:.1f} s overdue"
        lines.append(
            f"timer {timer.key}: {timer.size} entries, next due {iso(timer.next_due)} ({when})"
        )
    lines.append(f"dead letters: {stats.dead_letters} (see `notifyd dlq list`)")
    lines.append("")
    counts = sorted(stats.notifications.items())
    total = sum(stats.notifications.values())
    lines.append(table(("NOTIFICATIONS", "COUNT"), [*counts, ("total", total)]))
    return "\n".join(lines)


async def command(settings: Settings, *, as_json: bool) -> int:
    stats = await collect(settings)
    if as_json:
        print_json(stats.as_json())
    else:
        print(render(stats))
    return connect.OK
