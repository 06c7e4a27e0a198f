"""Supervised actors: each runs as its own task and is restarted with capped backoff.

One failing actor never takes the process down; an actor that keeps failing past a restart
budget does, on purpose, so that systemd (which can do more than we can) takes over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from notifyd.logs import actor_var

log = logging.getLogger("notifyd.supervisor")

CANCEL_GRACE_S = 2.0


class Actor(Protocol):
    """A long-running unit of work: returns when `stop` is set, raises when it breaks."""

    name: str

    async def run(self, stop: asyncio.Event) -> None: ...


def exponential_backoff(attempt: int, base: float, cap: float, jitter: bool = True) -> float:
    """Seconds to wait before attempt number `attempt` (1-based): base·2ⁿ, capped, jittered."""
    delay = min(cap, base * (2 ** min(max(0, attempt - 1), 64)))  # bounded exponent
    return random.uniform(delay / 2, delay) if jitter else delay


async def sleep_or_stop(
    stop: asyncio.Event, seconds: float, *, also: asyncio.Event | None = None
) -> bool:
    """Sleep up to `seconds`, less if `also` is set; return True at once if `stop` is set."""
    if stop.is_set():
        return True
    waiters = [asyncio.ensure_future(stop.wait())]
    if also is not None:
        waiters.append(asyncio.ensure_future(also.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    return stop.is_set()


@dataclass
class _Slot:
    actor: Actor
    task: asyncio.Task[None] | None = None
    failures: int = 0
    running: bool = False
    recent_crashes: deque[float] = field(default_factory=deque)


class RestartBudgetExceeded(RuntimeError):
    """An actor crashed more often than the budget allows: the process should exit non-zero."""


class Supervisor:
    def __init__(
        self,
        actors: list[Actor],
        *,
        on_restart: Callable[[str], None] | None = None,
        backoff_base: float = 0.2,
        backoff_cap: float = 30.0,
        max_restarts: int = 20,
        restart_window: float = 60.0,
    ) -> None:
        self._slots = [_Slot(actor) for actor in actors]
        self._on_restart = on_restart
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_restarts = max_restarts
        self._restart_window = restart_window
        self._stop = asyncio.Event()
        self.fatal = asyncio.Event()
        self.fatal_reason = ""

    def start(self) -> None:
        for slot in self._slots:
            slot.task = asyncio.create_task(
                self._keep_running(slot), name=f"actor:{slot.actor.name}"
            )

    @property
    def healthy(self) -> bool:
        """Every actor is running (not waiting out a backoff) and none has given up."""
        return not self.fatal.is_set() and all(slot.running for slot in self._slots)

    def status(self) -> dict[str, str]:
        return {
            slot.actor.name: "running" if slot.running else "restarting" for slot in self._slots
        }

    async def _keep_running(self, slot: _Slot) -> None:
        actor_var.set(slot.actor.name)
        while not self._stop.is_set():
            slot.running = True
            try:
                await slot.actor.run(self._stop)
                if self._stop.is_set():
                    return
                raise RuntimeError("actor returned without being asked to stop")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    slot.running = False
                    raise  # the supervisor (or the loop) is cancelling us: really stop
                # a cancellation nobody asked for (a library cancelled a future under the
                # actor) is a crash like any other, not a silent death
                log.exception("actor ended by a stray cancellation")
            except Exception:
                log.exception("actor crashed")
            if not await self._back_off(slot):
                return

    async def _back_off(self, slot: _Slot) -> bool:
        """Count the crash and wait out the backoff; False when the actor must not restart."""
        slot.running = False
        slot.failures += 1
        now = time.monotonic()
        slot.recent_crashes.append(now)
        while slot.recent_crashes and now - slot.recent_crashes[0] > self._restart_window:
            slot.recent_crashes.popleft()
        if len(slot.recent_crashes) > self._max_restarts:
            self.fatal_reason = (
                f"actor {slot.actor.name} crashed {len(slot.recent_crashes)} times "
                f"in {self._restart_window:.0f}s"
            )
            log.critical("restart budget exceeded", extra={"reason": self.fatal_reason})
            self.fatal.set()
            return False
        delay = exponential_backoff(len(slot.recent_crashes), self._backoff_base, self._backoff_cap)
        if await sleep_or_stop(self._stop, delay):
            return False
        if self._on_restart is not None:
            self._on_restart(slot.actor.name)
        log.info("actor restarting", extra={"after_s": round(delay, 3), "failures": slot.failures})
        return True

    async def stop(self, grace: float) -> None:
        """Ask every actor to stop, wait up to `grace` seconds, then cancel what is left."""
        self._stop.set()
        tasks = [slot.task for slot in self._slots if slot.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            log.warning("actor did not stop in time; cancelling", extra={"task": task.get_name()})
            task.cancel()
        if pending:
            # cancelled work unwinds quickly (its entries stay pending for a peer): a short bound
            await asyncio.wait(pending, timeout=min(grace, CANCEL_GRACE_S))
        for slot in self._slots:
            slot.running = False
