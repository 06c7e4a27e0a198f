"""Timer: moves due entries of the wheel (retries now, reminders next) onto their streams.

It sleeps until the earliest due time; an entry scheduled by this process wakes it at once,
and it never sleeps longer than a short tick, so an entry added by another instance is picked
up promptly too. The move itself is one atomic Lua step, so any number of instances can run
the timer and each entry still moves once.

With a lookahead (NOTIFYD_REMINDER_LOOKAHEAD) it moves entries that far ahead of their time,
in chunks: after a move it sleeps at least half the lookahead, so each entry reaches its
stream between half the lookahead and the whole of it early. The reminder firer uses that
time to read and plan what it fires, and fires each reminder at its own time (see
`actors.reminder_firer`): on a loaded loop the stream read, the read of the rows and the
planning were most of a reminder's lateness. A delivery retry shares the wheel and may start
that much early; its backoff is jittered by far more.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from notifyd.streams.schedule import Schedule
from notifyd.supervisor import sleep_or_stop

MAX_SLEEP_S = 0.25
BATCH = 500


class Timer:
    name = "timer"

    def __init__(
        self, schedule: Schedule, *, max_sleep: float = MAX_SLEEP_S, lookahead: float = 0.0
    ) -> None:
        self._schedule = schedule
        self._max_sleep = max_sleep
        self._lookahead = lookahead

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # cleared before reading the wheel: anything scheduled from here on wakes us
            self._schedule.changed.clear()
            horizon = datetime.now(UTC) + timedelta(seconds=self._lookahead)
            moved = await self._schedule.move_due(horizon, BATCH)
            if moved >= BATCH:
                continue  # more are due right now
            next_ms = await self._schedule.next_due_ms()
            wait = self._max_sleep
            if next_ms is not None:
                wait = min(wait, max(0.0, next_ms / 1000 - self._lookahead - time.time()))
            if moved and self._lookahead:
                # in chunks: what falls due meanwhile is still moved ahead of its time
                wait = max(wait, min(self._max_sleep, self._lookahead / 2))
            if await sleep_or_stop(stop, wait, also=self._schedule.changed):
                return
