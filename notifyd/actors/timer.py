"""Timer: moves due entries of the wheel (delivery retries, reminders) onto their streams.

It sleeps until the earliest due time; an entry scheduled by this process wakes it at once
when it must move sooner than the sleep would end (one due later leaves the sleep alone: a
trigger's steps due seconds ahead, arriving a hundred times a second, would otherwise wake
it each time and move the wheel in slivers), and it never sleeps longer than a short tick,
so an entry added by another instance is picked up promptly too. The move itself is one
atomic Lua step, so any number of instances can run the timer and each entry still moves
once.

With a lookahead (NOTIFYD_REMINDER_LOOKAHEAD) it moves the entries of the streams that ask
for it (reminders, workflow steps) that far ahead of their time, in chunks: after a move it
sleeps at least half the lookahead (unless a retry falls due sooner), so each entry reaches
its stream between half the lookahead and the whole of it early. The firers use that time to
read and plan what they fire, and fire each at its own time (see `actors.reminder_firer`,
`actors.workflow_firer`): on a loaded loop the stream read, the read of the rows and the
planning were most of a reminder's lateness. A delivery retry shares the wheel but never
moves early: its time may be a provider's Retry-After, which a send must not come before, so
the timer also wakes for the earliest retry it left waiting.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from notifyd.streams.schedule import Moved, Schedule
from notifyd.supervisor import sleep_or_stop

MAX_SLEEP_S = 0.25
BATCH = 500


class Timer:
    name = "timer"

    def __init__(
        self,
        schedule: Schedule,
        *,
        max_sleep: float = MAX_SLEEP_S,
        lookahead: float = 0.0,
        ahead: frozenset[str] = frozenset(),
    ) -> None:
        self._schedule = schedule
        self._max_sleep = max_sleep
        self._lookahead = lookahead if ahead else 0.0
        self._ahead = ahead

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # cleared before reading the wheel: anything scheduled from here on wakes us
            self._schedule.changed.clear()
            now = datetime.now(UTC)
            horizon = now + timedelta(seconds=self._lookahead)
            self._schedule.take_earliest_added()  # the move below sees all of it
            result = await self._schedule.move(now, BATCH, horizon=horizon, ahead=self._ahead)
            if result.moved >= BATCH:
                continue  # more are due right now
            if await self._sleep(stop, time.time() + self._wait(result)):
                return

    async def _sleep(self, stop: asyncio.Event, until: float) -> bool:
        """Until the epoch second `until`, or sooner when this process schedules an entry
        that may move before then (a lookahead before its time); True when stopping."""
        while True:
            if await sleep_or_stop(stop, until - time.time(), also=self._schedule.changed):
                return True
            if not self._schedule.changed.is_set():
                return False  # slept the whole time: move now
            self._schedule.changed.clear()
            earliest = self._schedule.take_earliest_added()
            if earliest is None or earliest / 1000 - self._lookahead < until:
                return False  # it may move before the sleep would end: move now

    def _wait(self, result: Moved) -> float:
        """Until the next entry may move: one beyond the horizon a lookahead before its time
        (it may be a reminder), one left waiting within it at its own time (a retry)."""
        now = time.time()
        wait = self._max_sleep
        if result.beyond_ms is not None:
            wait = max(0.0, result.beyond_ms / 1000 - self._lookahead - now)
        if result.moved and self._lookahead:
            # in chunks: what falls due meanwhile is still moved ahead of its time
            wait = max(wait, min(self._max_sleep, self._lookahead / 2))
        if result.waiting_ms is not None:
            wait = min(wait, max(0.0, result.waiting_ms / 1000 - now))
        return min(wait, self._max_sleep)
