"""Entries the timer moved off the wheel (`schedule.MOVE_DUE`), possibly ahead of their time:
the due time each was moved for, and firing what they name in waves, each once its time has
come by the wall clock. The reminder and workflow firers share this."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from notifyd.streams.consumer import Entry, Poison

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def due_of(entry: Entry) -> datetime:
    """The due time this entry was moved for (its `due_ms`, with 1 ms allowed for float
    rounding); now for an entry without one (added by hand). ValueError when malformed."""
    due_ms = entry.fields.get(b"due_ms")
    if due_ms is None:
        return datetime.now(UTC)
    return datetime.fromtimestamp(float(due_ms) / 1000, UTC) + timedelta(milliseconds=1)


async def sleep_until(when: datetime) -> None:
    """Sleeps until `when` by the wall clock (the clock due times are written in)."""
    wait = (when - datetime.now(UTC)).total_seconds()
    if wait > 0:
        await asyncio.sleep(wait)


async def latest_due(
    entries: list[Entry],
    parse: Callable[[Entry], tuple[K, datetime]],
    dead_letter: Callable[[Entry, str], Awaitable[None]],
) -> dict[K, datetime]:
    """What the entries name (`parse`: its key and due time), each with the latest due time
    it was moved for: a replayed entry fires once. An entry `parse` finds malformed
    (`Poison`) goes to the dead letters."""
    wanted: dict[K, datetime] = {}
    for entry in entries:
        try:
            key, due = parse(entry)
        except Poison as exc:
            await dead_letter(entry, str(exc))
            continue
        wanted[key] = max(due, wanted.get(key, due))
    return wanted


async def in_waves(
    items: list[T],
    when: Callable[[T], datetime],
    fire: Callable[[list[T]], Awaitable[None]],
) -> None:
    """`items` fired in waves by their time (`when`): each wave, once its time has come,
    holds every item whose time has come by then."""
    items = sorted(items, key=when)
    while items:
        await sleep_until(when(items[0]))
        now = datetime.now(UTC)
        ready = bisect.bisect_right(items, now, key=when)
        await fire(items[:ready])
        del items[:ready]
