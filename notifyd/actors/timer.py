"""Timer: moves due entries of the wheel (retries now, reminders next) onto their streams.

It sleeps until the earliest due time; an entry scheduled by this process wakes it at once,
and it never sleeps longer than a short tick, so an entry added by another instance is picked
up promptly too. The move itself is one atomic Lua step, so any number of instances can run
the timer and each entry still moves once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from notifyd.streams.schedule import Schedule
from notifyd.supervisor import sleep_or_stop

MAX_SLEEP_S = 0.25
BATCH = 500


class Timer:
    name = "timer"

    def __init__(self, schedule: Schedule, *, max_sleep: float = MAX_SLEEP_S) -> None:
        self._schedule = schedule
        self._max_sleep = max_sleep

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # cleared before reading the wheel: anything scheduled from here on wakes us
            self._schedule.changed.clear()
            moved = await self._schedule.move_due(datetime.now(UTC), BATCH)
            if moved >= BATCH:
                continue  # more are due right now
            next_ms = await self._schedule.next_due_ms()
            wait = self._max_sleep
            if next_ms is not None:
                wait = min(wait, max(0.0, next_ms / 1000 - time.time()))
            if await sleep_or_stop(stop, wait, also=self._schedule.changed):
                return
