"""Fair delivery across tenants, in process: a round-robin gate and a breaker per relay.

A sender reads its stream in arrival order, which is one tenant's backlog first and every
other tenant's mail behind it. Two in-process pieces keep one tenant from taking the
channel's slots (see docs/architecture.md, "Fair delivery across tenants"):

- `FairGate`: at most `slots` sends at once, at most `per_tenant` of them one tenant's, and
  when a slot frees it goes to the next tenant with work in round-robin order. A tenant may
  keep only `queue_per_tenant` entries waiting; past that `Full` tells the sender to park the
  entry (on the timer wheel, durably) instead of holding a place in memory.
- `Breaker`: per relay configuration (or provider account). After `threshold` consecutive
  failures to reach it, it opens for `cooldown` seconds: its mail is parked, not sent and not
  charged an attempt. Then one probe goes out (half open); success closes it, failure opens
  it again.

Both are plain synchronous state, decided without a round trip: what they cost per send is
a few dictionary operations.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class Full(Exception):
    """The tenant already has as many entries waiting as it may keep in memory."""


class FairGate:
    """Send slots handed out round robin over tenants, with a cap per tenant.

    Invariant: an entry waits only while every slot is busy or its tenant is at its cap, so
    a free slot always goes at once to a tenant that can use it.

    Work-conserving: a tenant past its cap may still borrow an idle slot while no other
    tenant waits and `may_borrow(tenant)` (its sends are fast), but never the last
    `per_tenant` slots: those stay free for a tenant that turns up, which therefore gets its
    whole cap at once. A lone tenant on a healthy relay keeps the channel's throughput; a
    tenant whose sends turn slow stops borrowing.
    """

    def __init__(
        self,
        slots: int,
        per_tenant: int,
        queue_per_tenant: int,
        on_change: Callable[[str, int], None] | None = None,
        may_borrow: Callable[[str], bool] | None = None,
    ) -> None:
        self._slots = slots
        self._per_tenant = per_tenant
        self._queue_per_tenant = queue_per_tenant
        self._on_change = on_change  # (tenant, sends in flight) → a gauge
        self._may_borrow = may_borrow
        self._running: dict[str, int] = {}
        self._busy = 0
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._ring: deque[str] = deque()  # tenants with waiting entries, in serving order

    def in_flight(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    @property
    def lendable(self) -> int:
        """The most sends one tenant may have in flight while it borrows."""
        return max(self._per_tenant, self._slots - self._per_tenant)

    def others_waiting(self, tenant: str) -> bool:
        return any(other != tenant for other in self._ring)

    def waiting(self, tenant: str) -> int:
        return len(self._waiting.get(tenant, ()))

    def full(self, tenant: str) -> bool:
        """Whether `acquire` would raise `Full`: no slot at once, and the queue at its bound."""
        return not self._grantable(tenant) and self.waiting(tenant) >= self._queue_per_tenant

    def take_now(self, tenant: str) -> bool:
        """A slot at once if one is free for `tenant` (True), without waiting: the common
        case costs no future and no deadline."""
        if self._grantable(tenant):
            self._take(tenant)
            return True
        return False

    async def acquire(self, tenant: str) -> None:
        """A slot for one send of `tenant`; raises `Full` rather than queue past the bound."""
        if self.full(tenant):
            raise Full(tenant)
        future = self.enqueue(tenant)
        if future is None:
            return
        try:
            await future
        except asyncio.CancelledError:
            self.withdraw(tenant, future)  # granted as we were cancelled: handed on
            raise

    def enqueue(self, tenant: str) -> asyncio.Future[None] | None:
        """`acquire` past the queue bound, for a caller that waits on its own terms: None
        when the slot is the caller's at once, else a future done when it is. The caller
        either gets the slot or gives its place up with `withdraw`, keeping its place in
        the queue while it looks around (see the sender's held entries)."""
        if self.take_now(tenant):
            return None
        queue = self._waiting.get(tenant)
        if queue is None:
            queue = self._waiting[tenant] = deque()
        if not queue:
            self._ring.append(tenant)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        return future

    def _grantable(self, tenant: str) -> bool:
        """A slot at once: the tenant has nobody queued, and it is under its cap (or may
        borrow) with a slot free."""
        return (
            not self._waiting.get(tenant)
            and self._busy < self._slots
            and (
                self.in_flight(tenant) < self._per_tenant
                or (not self._ring and self._can_borrow(tenant))
            )
        )

    def withdraw(self, tenant: str, future: asyncio.Future[None]) -> None:
        """Give up a place taken with `enqueue` (a slot granted meanwhile is handed on)."""
        if future.done() and not future.cancelled():
            self.release(tenant)
        else:
            future.cancel()
            self._forget(tenant, future)

    def release(self, tenant: str) -> None:
        left = self._running[tenant] - 1
        if left:
            self._running[tenant] = left
        else:
            del self._running[tenant]
        self._busy -= 1
        if self._on_change is not None:
            self._on_change(tenant, left)
        self._grant()

    def _can_borrow(self, tenant: str) -> bool:
        return (
            self._may_borrow is not None
            and self._busy < self._slots - self._per_tenant
            and self._may_borrow(tenant)
        )

    def _take(self, tenant: str) -> None:
        running = self._running.get(tenant, 0) + 1
        self._running[tenant] = running
        self._busy += 1
        if self._on_change is not None:
            self._on_change(tenant, running)

    def _grant(self) -> None:
        """Free slots to the tenants with work, each in turn, skipping those at their cap."""
        while self._busy < self._slots and self._ring:
            for _ in range(len(self._ring)):
                tenant = self._ring[0]
                self._ring.rotate(-1)  # served or not, it goes to the back of the ring
                if self.in_flight(tenant) < self._per_tenant:
                    break
            else:
                # every tenant with work is at its cap; a lone one may borrow
                if len(self._ring) != 1 or not self._can_borrow(self._ring[0]):
                    return
                tenant = self._ring[0]
            queue = self._waiting[tenant]
            future = queue.popleft()
            if not queue:
                del self._waiting[tenant]
                self._ring.remove(tenant)
            if future.done():
                continue  # its waiter was cancelled and has not forgotten it yet
            self._take(tenant)
            future.set_result(None)

    def _forget(self, tenant: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        try:
            queue.remove(future)
        except ValueError:
            return
        if not queue:
            del self._waiting[tenant]
            self._ring.remove(tenant)


class BreakerState(enum.IntEnum):
    """The gauge's values: closed 0, open 1, half open 2."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class Park:
    """Do not send now: park until `until` (epoch seconds), for `reason`."""

    until: float
    reason: str


@dataclass(slots=True)
class Breaker:
    """One relay's circuit breaker. `display` is what a tenant may read in `last_error`
    (its own relay's host:port, or "the platform relay"), never the relay's own words."""

    label: str
    display: str
    threshold: int
    cooldown: float
    probe_timeout: float  # a probe not heard back from within this is given up on
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_failures: int = 0
    until: float = 0.0  # open: when a probe may go; half open: when the probe is given up on
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def check(self) -> Park | None:
        """Before a send: None to send (possibly as the probe), or how long to park."""
        now = self.clock()
        if self.state is BreakerState.CLOSED:
            return None
        if now < self.until:
            return Park(self.until, self._reason())
        # open past its cool-down, or a probe that never came back: this send probes
        self.state = BreakerState.HALF_OPEN
        self.until = now + self.probe_timeout
        return None

    def parked_until(self) -> Park | None:
        """`check` without becoming the probe: for an entry that would otherwise queue."""
        if self.state is BreakerState.CLOSED or self.clock() >= self.until:
            return None
        return Park(self.until, self._reason())

    def succeeded(self) -> bool:
        """The relay answered (a refusal is an answer too); True if that closed it."""
        changed = self.state is not BreakerState.CLOSED
        self.state = BreakerState.CLOSED
        self.failures = 0
        return changed

    def failed(self) -> bool:
        """The relay could not be reached or did not answer in time; True if that opened it."""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.threshold
        ):
            self.state = BreakerState.OPEN
            self.opened_failures = self.failures
            self.until = self.clock() + self.cooldown
            return True
        return False

    def abandon(self) -> None:
        """The probe sent nothing after all (the row was done or taken): the next send probes."""
        if self.state is BreakerState.HALF_OPEN:
            self.until = self.clock()

    def _reason(self) -> str:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.until))
        return (
            f"relay {self.display} unavailable (circuit open after {self.opened_failures} "
            f"failures); parked until {until}"
        )


class Pacer:
    """When to bring back an entry parked because its tenant was at its cap.

    Each tenant's parked entries are spread out at about the rate the tenant can send
    (`interval` apart), so a backlog of thousands comes back a little at a time instead of
    all together, only to be parked again; never later than `longest` from now (a backlog
    larger than that comes back in bunches, once per `longest`).
    """

    def __init__(
        self, shortest: float, longest: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._shortest = shortest
        self._longest = max(shortest, longest)
        self._clock = clock
        self._next: dict[str, float] = {}

    def next(self, tenant: str, interval: float) -> float:
        now = self._clock()
        due = min(max(now + self._shortest, self._next.get(tenant, 0.0)), now + self._longest)
        self._next[tenant] = due + interval
        if len(self._next) > 10_000:  # forget tenants whose parked entries are all due
            self._next = {t: at for t, at in self._next.items() if at > now}
        return due


class SendTimes:
    """How long sends take, per tenant: a moving average of the finished ones, or the age of
    the oldest still running if that is longer (a hung relay's sends are slow long before
    they finish, and a fast average would bring its parked mail back too soon). A send that
    could not reach its relay marks the tenant failing until one goes through again; a
    tenant not heard of yet is assumed to take the channel's average."""

    def __init__(self, initial: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._channel = initial
        self._clock = clock
        self._average: dict[str, float] = {}
        self._running: dict[str, list[float]] = {}
        self._failing: set[str] = set()

    def started(self, tenant: str) -> float:
        at = self._clock()
        self._running.setdefault(tenant, []).append(at)
        return at

    def finished(self, tenant: str, started: float, *, answered: bool = True) -> None:
        running = self._running[tenant]
        running.remove(started)
        if not running:
            del self._running[tenant]
        took = self._clock() - started
        average = self._average.get(tenant)
        self._average[tenant] = took if average is None else average + (took - average) * 0.2
        if answered:
            self._failing.discard(tenant)
            self._channel += (took - self._channel) * 0.05
        else:
            self._failing.add(tenant)
        if len(self._average) > 10_000:
            self._average = {t: a for t, a in self._average.items() if t in self._running}
            self._failing &= set(self._average)

    def known(self, tenant: str) -> bool:
        """Whether a send of the tenant finished lately (its average is its own)."""
        return tenant in self._average

    def healthy(self, tenant: str) -> bool:
        """Known, and its last finished send reached the relay."""
        return tenant in self._average and tenant not in self._failing

    def average(self, tenant: str) -> float:
        return self._average.get(tenant, self._channel)

    def estimate(self, tenant: str) -> float:
        average = self.average(tenant)
        running = self._running.get(tenant)
        return max(average, self._clock() - running[0]) if running else average
