"""Channel sender: claim the delivery in PostgreSQL, call the provider, record, then ack.

The claim (`UPDATE … WHERE status IN ('dispatched','retrying') RETURNING`) is what makes a
replayed entry or a second instance harmless: only one claimant gets the row. A claimant that
died mid-send leaves the row `sending`; after the lease (NOTIFYD_CLAIM_IDLE) another instance
may claim it again, which is the at-least-once edge: that one message can reach the provider
twice, nothing can be lost.

Email and SMS go through a fair gate first (`notifyd.fairness`): tenants with work take the
channel's slots in turn, each at most NOTIFYD_TENANT_SEND_CONCURRENCY at once; an entry
whose tenant also has its queue full, or whose relay's circuit breaker is open, is parked on
the timer wheel as a retry that used no attempt, so it holds no slot and no place in memory.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd.alerts import Alerting
from notifyd.fairness import Breaker, BreakerState, FairGate, Full, Pacer, Park, SendTimes
from notifyd.keys import SEND_GROUP, Keys
from notifyd.metrics import Metrics
from notifyd.payloads import DeliveryRef, PayloadError
from notifyd.providers.base import (
    Delivery,
    PermanentError,
    Provider,
    ProviderError,
    RecipientRefused,
    Sent,
    TransientError,
    Unreachable,
    delivery_of,
)
from notifyd.retries import retry_item, waiting_item
from notifyd.settings import Settings
from notifyd.store import deliveries
from notifyd.store import suppressions as suppression_store
from notifyd.store.batch import GroupCommit
from notifyd.streams.consumer import Acknowledged, Defer, Entry, Poison, StreamConsumer, Timing
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule
from notifyd.supervisor import exponential_backoff

log = logging.getLogger("notifyd.actors.sender")


BATCH = 64  # entries per read for a batched provider
# Claims of one delivery beyond NOTIFYD_SEND_MAX_ATTEMPTS before it fails for good: a claim
# that ended without an outcome (the handler crashed on the row, the process died while
# sending) is counted by the row's attempts, and the sweeper puts such a row back; without a
# bound a row that crashes its handler would be claimed, crash and be put back forever.
UNRECORDED_CLAIMS = 2
BATCHES_IN_FLIGHT = 2
# a per-entry sender reads this many times its concurrency ahead: entries wait in the fair
# gate (bounded per tenant), so a tenant at its cap cannot keep other tenants' entries unread
READ_AHEAD = 8
INITIAL_SEND_S = 0.05  # a tenant's send time until its first send finished
BORROW_BELOW_S = 1.0
PACE_MARGIN = 0.8
# while entries are held, one watcher looks at the stream's tail this often for all of them
# (one XRANGE of what was added since the last look: usually none or a few entries)
HOLD_RECHECK_S = 0.02
# a question within this long of the last look is answered by it
LOOK_EVERY_S = 0.01
LOOKAHEAD_ENTRIES = 1024  # the most entries one look reads
BREAKER_JITTER_S = 1.0  # parked mail of an open circuit comes back spread over this


def _delivery(row: asyncpg.Record) -> Delivery:
    """A claimed row (content stored, attempt counted by the claim)."""
    return delivery_of(
        row,
        subject=row["subject"],
        body=row["body"] or "",
        html=row["html_body"],
        attempt=row["attempts"],
    )


def _entry_at(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class Lookahead:
    """Which tenants have entries in the stream past the newest one this sender read.

    It reads the stream's tail on from where its last look ended (XRANGE of at most
    LOOKAHEAD_ENTRIES, at most every LOOK_EVERY_S, only while a tenant's entries are held
    past its queue), so each entry is looked at once however long a backlog is, and an empty
    look is one cheap round trip; it keeps each tenant's newest entry id, and a tenant has
    others behind it while another tenant's newest is past what this sender read. The look
    that first finds another tenant behind wakes every held entry of the tenants it concerns
    at once (`others_seen`), so a held backlog is set aside together, in a few batches."""

    def __init__(self, redis: Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._newest = (0, 0)  # the newest entry this sender read
        self._looked = (0, 0)  # the newest entry a look saw
        self._last: dict[bytes, tuple[int, int]] = {}  # tenant → its newest entry looked at
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()
        self._waiters: dict[bytes, asyncio.Future[None]] = {}

    def saw(self, entry_id: bytes) -> None:
        read = _entry_at(entry_id)
        if read > self._newest:
            self._newest = read

    async def others_behind(self, tenant: str) -> bool:
        loop = asyncio.get_running_loop()
        if loop.time() < self._fresh_until and not self._lock.locked():
            # answered by the last look without queueing on the lock: a whole backlog of held
            # entries asking at once must not pass a lock one loop iteration at a time
            return self._others(tenant.encode())
        await self.look()
        return self._others(tenant.encode())

    async def look(self) -> None:
        """Look at the tail unless the last look is fresh, and wake the tenants it finds
        others behind (`others_seen`)."""
        loop = asyncio.get_running_loop()
        async with self._lock:  # one look for every entry that asks meanwhile
            if loop.time() >= self._fresh_until:
                await self._look()
                self._fresh_until = loop.time() + LOOK_EVERY_S
                self._wake()

    async def _look(self) -> None:
        ms, seq = max(self._looked, self._newest)
        rows: Any = await self._redis.xrange(
            self._stream, min=f"({ms}-{seq}", max="+", count=LOOKAHEAD_ENTRIES
        )
        newest = self._newest
        last = {key: at for key, at in self._last.items() if at > newest}  # not read yet
        for entry_id, fields in rows:
            last[fields.get(b"tenant_id", b"")] = self._looked = _entry_at(entry_id)
        self._last = last

    def _others(self, key: bytes) -> bool:
        newest = self._newest
        return any(at > newest for other, at in self._last.items() if other != key)

    def others_seen(self, tenant: str) -> asyncio.Future[None]:
        """Resolved by the next look that finds another tenant's entries behind `tenant`'s
        (one future shared by all of that tenant's held entries)."""
        key = tenant.encode()
        waiter = self._waiters.get(key)
        if waiter is None or waiter.done():
            waiter = self._waiters[key] = asyncio.get_running_loop().create_future()
        return waiter

    def _wake(self) -> None:
        for key, waiter in list(self._waiters.items()):
            if waiter.done():
                del self._waiters[key]
            elif self._others(key):
                waiter.set_result(None)
                del self._waiters[key]


class _Outcome(enum.Enum):
    """What one send told of its relay, for the relay's circuit breaker."""

    ANSWERED = "answered"  # sent, or a reply (4xx): the relay is up
    UNREACHABLE = "unreachable"  # could not connect, no greeting, timed out
    NOT_SENT = "not_sent"  # no provider call, or a failure that says nothing of the relay


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class _Held:
    """An entry held past its tenant's queue while it looks whether others wait behind."""

    entry_id: bytes
    ref: DeliveryRef
    place: asyncio.Future[None]  # its place in the gate's queue
    aside: asyncio.Future[None]  # done once set aside with the rest (stored and acked)


@dataclass(slots=True)  # a value, not frozen: see docs/architecture.md
class _ParkOrder:
    ref: DeliveryRef
    due: datetime
    reason: str
    entry_id: bytes  # acked with the wheel entry, in the same script call


MAX_BREAKERS = 10_000
_T = TypeVar("_T")


# a provider's batch send (in-app): one result per delivery, in order
SendMany = Callable[[Sequence[Delivery]], Awaitable[list[Sent | TransientError]]]

# (the delivery, its new status) → the user's live feed; for email and SMS with a user_id
StatusFeed = Callable[[Delivery, str], Awaitable[None]]


class Sender:
    def __init__(
        self,
        *,
        provider: Provider,
        pool: asyncpg.Pool,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        metrics: Metrics,
        schedule: Schedule,
        alerts: Alerting | None,
        consumer_name: str,
        concurrency: int,
        producer: Producer,
        on_status: StatusFeed | None = None,
    ) -> None:
        self._on_status = on_status
        self._send_many: SendMany | None = (
            getattr(provider, "send_many", None) if getattr(provider, "batched", False) else None
        )
        self._producer = producer
        self.channel = provider.channel
        self.name = f"sender:{self.channel}"
        self._provider = provider
        self._pool = pool
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._metrics = metrics
        self._schedule = schedule
        self._alerts = alerts
        self._gate = FairGate(
            concurrency,
            settings.tenant_send_concurrency,
            settings.tenant_send_queue,
            on_change=self._in_flight_changed,
            may_borrow=self._fast,
        )
        # parks of concurrent entries share one UPDATE and one ZADD
        self._parks: GroupCommit[_ParkOrder, int | None] = GroupCommit(
            self._park_many, max_batch=BATCH
        )
        # set-aside entries: their wheel entries and their acks in one script call per batch
        self._set_aside: GroupCommit[tuple[DeliveryRef, datetime, bytes], bool] = GroupCommit(
            self._set_aside_many, max_batch=BATCH
        )
        # a set-aside entry is back well before the sweeper would re-enqueue its row
        self._pacer = Pacer(
            settings.tenant_park_delay, min(settings.breaker_cooldown, settings.requeue_after / 2)
        )
        self._send_times = SendTimes(INITIAL_SEND_S)
        self._breakers: dict[object, Breaker] = {}
        self._held: dict[str, dict[bytes, _Held]] = {}  # tenant → its held entries, by id
        self._watcher: asyncio.Task[None] | None = None  # looks ahead while entries are held
        window = BATCHES_IN_FLIGHT if self._send_many else concurrency * READ_AHEAD
        self._lookahead = Lookahead(redis, keys.deliver(self.channel))
        self.consumer = StreamConsumer(
            redis,
            stream=keys.deliver(self.channel),
            group=SEND_GROUP,
            consumer=consumer_name,
            handle=self.handle,
            # a provider that sends a batch in one round trip (in-app) gets whole reads
            handle_batch=self.handle_batch if self._send_many else None,
            triage=None if self._send_many else self.set_aside_backlog,
            dead_letters=keys.dead_letters,
            producer=producer,
            on_dead=self._on_dead,
            concurrency=window,
            # per entry: reads of up to half the window, so a backlog to set aside goes fast
            batch=BATCH if self._send_many else max(concurrency, window // 2),
            timing=Timing.from_settings(settings),
            # a crashing handler (not a failing provider: that is a retry) gives up after this
            max_deliveries=settings.send_max_attempts + 2,
            metrics=metrics,
        )

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self.consumer.run(stop)
        finally:
            if self._watcher is not None:
                self._watcher.cancel()
                await asyncio.gather(self._watcher, return_exceptions=True)

    def _fast(self, tenant: str) -> bool:
        """Whether the tenant's sends are proven quick enough to lend it idle slots past its
        cap (a tenant not heard of lately is not: its relay may be the one that hangs)."""
        times = self._send_times
        return times.healthy(tenant) and times.estimate(tenant) < BORROW_BELOW_S

    def _park_interval(self, tenant: str) -> float:
        """How far apart a capped tenant's set-aside entries come back: a little faster than
        its sends finish (its queue absorbs the difference). A tenant proven fast is expected
        to borrow every lendable slot while nobody else waits; any other sends at its cap,
        as slowly as its oldest send has been running (a hung relay's sends are slow before
        they finish)."""
        times, gate, cap = self._send_times, self._gate, self._settings.tenant_send_concurrency
        if not self._fast(tenant):  # slow, failing, or not proven fast: sends at its cap
            per_send, sending = times.estimate(tenant), cap
        elif gate.others_waiting(tenant):
            per_send, sending = times.average(tenant), cap
        else:
            per_send, sending = times.average(tenant), gate.lendable
        return PACE_MARGIN * per_send / max(sending, gate.in_flight(tenant), 1)

    async def _enter(self, entry: Entry, ref: DeliveryRef) -> bool:
        """A send slot in the gate (True), or False: set the entry aside.

        Within its tenant's queue an entry waits its turn. Past it, the entry is held only
        while no other tenant's entries are behind it in the stream (one look ahead, shared
        by every held entry): a lone tenant's burst then costs nothing more than before,
        and as soon as another tenant's mail is queued behind, the excess is set aside so
        the reader gets to it: every held entry of the tenant at once, in one script call
        (`_set_aside_held`; this raises `Acknowledged`). A held entry looks at once (what
        the last look found, or a new look if that one is stale), then waits: for its slot,
        for its set-aside, or for a look of the one watcher (`_look_for_held`, every
        HOLD_RECHECK_S while anything is held) to find others behind. A hundred held entries
        cost one wake-up per look, not one each. Either way a place is not kept for ever:
        read entries must be handled well within the lease, or XAUTOCLAIM would hand them
        out a second time.
        """
        tenant = ref.tenant_id
        if self._gate.take_now(tenant):
            return True
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._settings.claim_idle / 4
        try:
            async with asyncio.timeout(give_up - loop.time()):
                await self._gate.acquire(tenant)
            return True
        except TimeoutError:
            return False
        except Full:
            pass
        future = self._gate.enqueue(tenant)  # held: its place kept while it looks around
        if future is None:
            return True
        held = _Held(entry.id, ref, future, loop.create_future())
        self._held.setdefault(tenant, {})[entry.id] = held
        lookahead = self._lookahead
        try:
            if await lookahead.others_behind(tenant):
                await self._set_aside_held(tenant)
            elif not future.done() and not held.aside.done():
                seen = lookahead.others_seen(tenant)
                self._watch_held()
                await asyncio.wait(
                    {future, seen, held.aside},
                    timeout=give_up - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if seen.done() and not future.done() and not held.aside.done():
                    await self._set_aside_held(tenant)
        except BaseException:
            if self._unhold(tenant, held):
                self._gate.withdraw(tenant, future)
            raise
        if not self._unhold(tenant, held):  # taken by a set-aside: its place is given up
            await asyncio.wait({held.aside})
            if held.aside.cancelled() or held.aside.exception() is not None:
                raise RuntimeError("setting the held entries aside failed") from (
                    None if held.aside.cancelled() else held.aside.exception()
                )
            self._metrics.parked.labels(self.channel, "tenant_cap").inc()
            raise Acknowledged
        if future.done() and not future.cancelled():
            return True
        self._gate.withdraw(tenant, future)
        return False

    def _watch_held(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._look_for_held())

    async def _look_for_held(self) -> None:
        """While entries are held: one look at the stream's tail every HOLD_RECHECK_S for
        all of them; a look that finds another tenant behind wakes that tenant's held
        entries, which set themselves aside. A look that fails is tried again at the next
        tick (held entries give up at their own deadline and are parked)."""
        failing = False
        while self._held:
            await asyncio.sleep(HOLD_RECHECK_S)
            try:
                await self._lookahead.look()
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.warning(
                        "looking ahead for held entries failed",
                        extra={"channel": self.channel, "error": type(exc).__name__},
                    )
                failing = True
            else:
                failing = False

    def _unhold(self, tenant: str, held: _Held) -> bool:
        """Take `held` off its tenant's held entries; False if a set-aside took it."""
        entries = self._held.get(tenant)
        if entries is None or entries.get(held.entry_id) is not held:
            return False
        del entries[held.entry_id]
        if not entries:
            del self._held[tenant]
        return True

    async def _set_aside_held(self, tenant: str) -> None:
        """Every entry of `tenant` held past its queue, set aside together: their places
        in the gate given up, their wheel entries and acks one script call. Each held
        entry learns the outcome from its `aside` future."""
        batch = list(self._held.pop(tenant, {}).values())
        if not batch:
            return  # taken by another entry's call, which is under way
        interval = self._park_interval(tenant)
        items = []
        for held in sorted(batch, key=lambda h: _entry_at(h.entry_id)):
            self._gate.withdraw(tenant, held.place)
            due = datetime.fromtimestamp(self._pacer.next(tenant, interval), UTC)
            items.append((waiting_item(self._keys, self.channel, held.ref), due))
        try:
            await self._schedule.add_many_acking(
                items, self.consumer.stream, SEND_GROUP, [h.entry_id for h in batch]
            )
        except BaseException as exc:
            for held in batch:
                if not held.aside.done():
                    if isinstance(exc, Exception):
                        held.aside.set_exception(exc)
                    else:
                        held.aside.cancel()
            raise
        for held in batch:
            if not held.aside.done():
                held.aside.set_result(None)

    async def set_aside_backlog(self, entries: list[Entry]) -> list[Entry]:
        """Before a read's entries get a task each: those of a tenant whose queue is full
        while other tenants' mail waits behind in the stream are set aside together, their
        wheel entries and acks one script call for the read, and never take a place in the
        consumer's window; the rest are returned to be handled one by one. This is what
        lets another tenant's mail overtake a backlog of thousands in a few reads. A tenant
        whose circuit is open is left to `handle` (its mail is parked, the row told why)."""
        for entry in entries:
            self._lookahead.saw(entry.id)
        aside: list[tuple[Entry, DeliveryRef]] = []
        rest: list[Entry] = []
        verdicts: dict[str, bool] = {}
        for entry in entries:
            try:
                ref = DeliveryRef.from_fields(entry.fields)
            except PayloadError:
                rest.append(entry)  # handle dead-letters it
                continue
            tenant = ref.tenant_id
            if tenant not in verdicts:
                verdicts[tenant] = (
                    self._gate.full(tenant)
                    and await self._lookahead.others_behind(tenant)
                    and not await self._circuit_open(tenant)
                )
            if verdicts[tenant]:
                aside.append((entry, ref))
            else:
                rest.append(entry)
        if aside:
            items = []
            for _, ref in aside:
                interval = self._park_interval(ref.tenant_id)
                due = datetime.fromtimestamp(self._pacer.next(ref.tenant_id, interval), UTC)
                items.append((waiting_item(self._keys, self.channel, ref), due))
            await self._schedule.add_many_acking(
                items, self.consumer.stream, SEND_GROUP, [entry.id for entry, _ in aside]
            )
            self._metrics.parked.labels(self.channel, "tenant_cap").inc(len(aside))
        return rest

    async def _circuit_open(self, tenant_id: str) -> bool:
        breaker = await self._breaker(tenant_id)
        return breaker is not None and breaker.parked_until() is not None

    def _in_flight_changed(self, tenant: str, count: int) -> None:
        self._metrics.tenant_in_flight.labels(self.channel, tenant).set(count)

    async def handle(self, entry: Entry) -> None:
        """Fair order first: an entry whose relay's circuit is open, or whose tenant has its
        sends in flight and its queue full, is parked (no provider call, no attempt); the
        rest wait their tenant's turn in the gate, then claim, send and record."""
        try:
            ref = DeliveryRef.from_fields(entry.fields)
        except PayloadError as exc:
            raise Poison(str(exc)) from None
        breaker = await self._breaker(ref.tenant_id)
        if breaker is not None and (parked := breaker.parked_until()) is not None:
            await self._park(entry, ref, parked.until + random.random() * BREAKER_JITTER_S, parked)
            return
        self._lookahead.saw(entry.id)
        if not await self._enter(entry, ref):
            interval = self._park_interval(ref.tenant_id)
            await self._park(entry, ref, self._pacer.next(ref.tenant_id, interval), None)
            return
        try:
            probe = False
            if breaker is not None:
                parked = self._watch(breaker, breaker.check)
                if parked is not None:
                    await self._park(
                        entry, ref, parked.until + random.random() * BREAKER_JITTER_S, parked
                    )
                    return
                probe = breaker.state is BreakerState.HALF_OPEN  # check() made this the probe
            started = self._send_times.started(ref.tenant_id)
            outcome = _Outcome.NOT_SENT
            try:
                outcome = await self._deliver(ref)
            finally:
                answered = outcome is not _Outcome.UNREACHABLE
                self._send_times.finished(ref.tenant_id, started, answered=answered)
            if breaker is not None:
                if outcome is _Outcome.UNREACHABLE:
                    if self._watch(breaker, breaker.failed):
                        log.warning(
                            "relay circuit opened",
                            extra={"tenant": ref.tenant_id, "relay": breaker.label},
                        )
                elif outcome is _Outcome.ANSWERED:
                    if self._watch(breaker, breaker.succeeded):
                        log.info(
                            "relay circuit closed",
                            extra={"tenant": ref.tenant_id, "relay": breaker.label},
                        )
                elif probe:
                    self._watch(breaker, breaker.abandon)  # nothing was sent: probe again
        finally:
            self._gate.release(ref.tenant_id)

    async def _breaker(self, tenant_id: str) -> Breaker | None:
        """The circuit breaker of the tenant's relay (made on first use), if it has one."""
        try:
            route = await self._provider.route(tenant_id)
        except ProviderError:
            return None  # the send will fail the same way, and be retried as such
        if route is None:
            return None
        breaker = self._breakers.get(route.key)
        if breaker is None:
            if len(self._breakers) >= MAX_BREAKERS:  # forget quiet ones: closed, no failures
                self._breakers = {
                    key: b
                    for key, b in self._breakers.items()
                    if b.state is not BreakerState.CLOSED or b.failures
                }
            s = self._settings
            breaker = self._breakers[route.key] = Breaker(
                label=route.label,
                display=route.display,
                threshold=s.breaker_failures,
                cooldown=s.breaker_cooldown,
                probe_timeout=s.send_timeout + 1.0,
            )
            self._metrics.relay_breaker.labels(self.channel, route.label).set(breaker.state)
        return breaker

    def _watch(self, breaker: Breaker, step: Callable[[], _T]) -> _T:
        """Run one breaker step; its gauge follows a change of state."""
        before = breaker.state
        result = step()
        if breaker.state is not before:
            self._metrics.relay_breaker.labels(self.channel, breaker.label).set(breaker.state)
        return result

    async def _park(
        self, entry: Entry, ref: DeliveryRef, until: float, breaker: Park | None
    ) -> None:
        """Move the entry off the head without a provider call or an attempt, to come back
        from the wheel at `until`. For an open circuit the row waits `retrying` with the
        reason in `last_error` (the sweeper rebuilds that same wheel entry from the row); for
        a tenant at its cap see `waiting_item`. The wheel entries of a batch and the acks of
        its stream entries are one script call (atomic: never an ack without its wheel
        entry), so this raises `Acknowledged` for the consumer not to ack again; a row that
        was not parked (not ours to take) goes the usual way instead."""
        due = datetime.fromtimestamp(until, UTC)
        if breaker is None:
            # its tenant is merely at its cap: the row need not change (nothing to tell its
            # owner), only the wheel entry is written; cheap enough for a whole backlog
            await self._set_aside.submit((ref, due, entry.id))
            self._metrics.parked.labels(self.channel, "tenant_cap").inc()
            raise Acknowledged
        if await self._parks.submit(_ParkOrder(ref, due, breaker.reason, entry.id)) is None:
            await self._not_claimed(ref)
            return
        self._metrics.parked.labels(self.channel, "breaker").inc()
        raise Acknowledged

    async def _set_aside_many(
        self, items: Sequence[tuple[DeliveryRef, datetime, bytes]]
    ) -> list[bool]:
        """One script call: ZADD of the batch's wheel entries and XACK of its entries."""
        await self._schedule.add_many_acking(
            [(waiting_item(self._keys, self.channel, ref), due) for ref, due, _ in items],
            self.consumer.stream,
            SEND_GROUP,
            [entry_id for _, _, entry_id in items],
        )
        return [True] * len(items)

    async def _park_many(self, orders: Sequence[_ParkOrder]) -> list[int | None]:
        """One UPDATE for the rows, then one script call for their wheel entries and the
        acks of their stream entries (a row not parked is left to its caller)."""
        parked = await deliveries.park_many(
            self._pool, [(o.ref.tenant_id, o.ref.uuid, o.due, o.reason) for o in orders]
        )
        items = [
            (retry_item(self._keys, self.channel, o.ref, parked[o.ref.uuid]), o.due)
            for o in orders
            if o.ref.uuid in parked
        ]
        acks = [o.entry_id for o in orders if o.ref.uuid in parked]
        await self._schedule.add_many_acking(items, self.consumer.stream, SEND_GROUP, acks)
        return [parked.get(o.ref.uuid) for o in orders]

    async def _not_claimed(self, ref: DeliveryRef) -> None:
        """The row was not ours to take: leave the entry pending while a peer holds it or its
        retry is not due (Defer), ack it when it is done or not to be sent."""
        current = await deliveries.state(self._pool, ref.tenant_id, ref.uuid)
        if current is not None and current["status"] == "sending":
            raise Defer("another sender holds this delivery")
        if current is not None and current["status"] == "retrying":
            raise Defer("the retry is not due yet")  # taken over again after the lease

    async def _deliver(self, ref: DeliveryRef) -> _Outcome:
        notification_id = ref.uuid
        row = await deliveries.claim(
            self._pool, ref.tenant_id, notification_id, self._settings.claim_idle
        )
        if row is None:
            await self._not_claimed(ref)
            return _Outcome.NOT_SENT  # done already, or not ours to send (suppressed): ack
        delivery = _delivery(row)
        if self._exhausted(delivery):
            await self._fail(ref, delivery, self._exhausted_reason(delivery))
            return _Outcome.NOT_SENT
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self._settings.send_timeout):
                sent = await self._provider.send(delivery)
        except TransientError as exc:
            await self._retry_or_fail(ref, delivery, exc.reason, exc.retry_after)
            return _Outcome.UNREACHABLE if isinstance(exc, Unreachable) else _Outcome.ANSWERED
        except TimeoutError:
            reason = f"provider did not answer within {self._settings.send_timeout:g}s"
            await self._retry_or_fail(ref, delivery, reason, None)
            return _Outcome.UNREACHABLE
        except RecipientRefused as exc:
            await self._refused(ref, delivery, exc)
            return _Outcome.ANSWERED  # the relay is alive: it judged the address
        except PermanentError as exc:
            await self._fail(ref, delivery, exc.reason)
            return _Outcome.NOT_SENT  # maybe the relay's no, maybe a message we cannot build
        finally:
            self._metrics.provider_latency.labels(self.channel).observe(
                asyncio.get_running_loop().time() - started
            )
        recorded = await deliveries.mark_sent(
            self._pool,
            ref.tenant_id,
            notification_id,
            delivery.attempt,
            sent.provider_message_id,
            sent.provider_status,
        )
        if recorded:  # not when a peer that took over the claim recorded it first
            self._metrics.deliveries.labels(self.channel, "sent").inc()
            await self._tell(delivery, "sent")
        return _Outcome.ANSWERED

    async def _tell(self, delivery: Delivery, status: str) -> None:
        """The user's open sockets learn what became of their email or SMS; a lost live
        event costs nothing (GET /notifications/{id}/ has the status), so it never fails
        the delivery."""
        if self._on_status is None or delivery.user_id is None:
            return
        try:
            await self._on_status(delivery, status)
        except RedisError as exc:
            log.info("delivery status not published", extra={"error": str(exc)})

    async def handle_batch(self, entries: list[Entry]) -> set[bytes]:
        """`handle` for a whole read: one claim, one provider round trip, one record.
        Returns the entries to leave pending (a peer holds them, or their retry is not due),
        as `handle` would Defer them."""
        refs: dict[bytes, DeliveryRef] = {}
        for entry in entries:
            try:
                refs[entry.id] = DeliveryRef.from_fields(entry.fields)
            except PayloadError as exc:
                await self.consumer.dead_letter(entry, str(exc))
        keys = [(ref.tenant_id, ref.uuid) for ref in refs.values()]
        if not keys:
            return set()
        rows = await deliveries.claim_many(self._pool, keys, self._settings.claim_idle)
        claimed = {row["id"] for row in rows}
        waiting = [(entry_id, ref) for entry_id, ref in refs.items() if ref.uuid not in claimed]
        deferred: set[bytes] = set()
        if waiting:
            states = await deliveries.states(
                self._pool, [(r.tenant_id, r.uuid) for _, r in waiting]
            )
            deferred = {
                entry_id
                for entry_id, ref in waiting
                if states.get(ref.uuid) in ("sending", "retrying")
            }
        if not rows:
            return deferred
        batch = []
        for delivery in map(_delivery, rows):
            if self._exhausted(delivery):
                ref = DeliveryRef(delivery.tenant_id, delivery.id)
                await self._fail(ref, delivery, self._exhausted_reason(delivery))
            else:
                batch.append(delivery)
        if not batch:
            return deferred
        assert self._send_many is not None
        started = asyncio.get_running_loop().time()
        results = await self._send_many(batch)
        self._metrics.provider_latency.labels(self.channel).observe(
            asyncio.get_running_loop().time() - started
        )
        sent = [
            (d.tenant_id, uuid.UUID(d.id), d.attempt, r.provider_message_id)
            for d, r in zip(batch, results, strict=True)
            if isinstance(r, Sent)
        ]
        if sent:
            recorded = await deliveries.mark_many_sent(self._pool, sent)
            self._metrics.deliveries.labels(self.channel, "sent").inc(len(recorded))
        for delivery, result in zip(batch, results, strict=True):
            if isinstance(result, TransientError):
                ref = DeliveryRef(delivery.tenant_id, delivery.id)
                await self._retry_or_fail(ref, delivery, result.reason, result.retry_after)
        return deferred

    def _exhausted(self, delivery: Delivery) -> bool:
        """Claimed more often than any run of attempts with outcomes can be (see
        UNRECORDED_CLAIMS): earlier claims ended without one."""
        return delivery.attempt > self._settings.send_max_attempts + UNRECORDED_CLAIMS

    def _exhausted_reason(self, delivery: Delivery) -> str:
        return (
            f"gave up after {delivery.attempt - 1} attempts, of which some ended without an "
            f"outcome (at most {self._settings.send_max_attempts} are allowed)"
        )

    async def _retry_or_fail(
        self, ref: DeliveryRef, delivery: Delivery, reason: str, retry_after: float | None
    ) -> None:
        if delivery.attempt >= self._settings.send_max_attempts:
            await self._fail(ref, delivery, f"{reason} (after {delivery.attempt} attempts)")
            return
        s = self._settings
        delay = exponential_backoff(delivery.attempt, s.retry_base, s.retry_cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, s.retry_cap))
        due = datetime.now(UTC) + timedelta(seconds=delay)
        notification_id = ref.uuid
        if await deliveries.mark_retrying(
            self._pool, ref.tenant_id, notification_id, delivery.attempt, reason, due
        ):
            await self._schedule.add(
                retry_item(self._keys, self.channel, ref, delivery.attempt), due
            )
            self._metrics.deliveries.labels(self.channel, "retrying").inc()
            await self._tell(delivery, "retrying")
            log.info(
                "delivery will be retried",
                extra={"id": delivery.id, "attempt": delivery.attempt, "in_s": round(delay, 2)},
            )

    async def _refused(self, ref: DeliveryRef, delivery: Delivery, exc: RecipientRefused) -> None:
        """The provider refused the recipient for good: the delivery fails with the provider's
        words and, in the same transaction, the address goes on the tenant's suppression
        list, so no later send reaches the provider. A recipient's own doing (a dead mailbox,
        a STOP), not an operator's problem: no dead-letter copy, no alert."""
        reason = f"{exc.reason} (the address is now on the suppression list)"
        async with self._pool.acquire() as conn, conn.transaction():
            if not await deliveries.mark_failed(
                conn, ref.tenant_id, ref.uuid, delivery.attempt, reason
            ):
                return  # a peer that took the claim over recorded an outcome first
            await suppression_store.add(
                conn,
                ref.tenant_id,
                delivery.channel,
                delivery.recipient,
                exc.suppress_as,
                exc.reason,
                notification_id=ref.uuid,
            )
        self._metrics.deliveries.labels(self.channel, "failed").inc()
        await self._tell(delivery, "failed")
        log.info(
            "recipient refused: address suppressed",
            extra={"id": delivery.id, "reason": exc.suppress_as},
        )

    async def _fail(self, ref: DeliveryRef, delivery: Delivery, reason: str) -> None:
        notification_id = ref.uuid
        if not await deliveries.mark_failed(
            self._pool, ref.tenant_id, notification_id, delivery.attempt, reason
        ):
            return
        self._metrics.deliveries.labels(self.channel, "failed").inc()
        await self._tell(delivery, "failed")
        await self._producer.add(
            self._keys.dead_letters,
            {
                "stream": self._keys.deliver(self.channel),
                "tenant_id": ref.tenant_id,
                "id": delivery.id,
                "reason": reason,
                "attempts": str(delivery.attempt),
            },
        )
        self._metrics.dead_letters.labels(self._keys.deliver(self.channel), "failed").inc()
        log.warning("delivery failed for good", extra={"id": delivery.id, "reason": reason})
        if self._alerts is not None:
            self._alerts.raise_alert(
                f"delivery-failed:{self.channel}",
                f"notifyd: a {self.channel} delivery failed",
                f"Notification {delivery.id} of tenant {ref.tenant_id} failed after "
                f"{delivery.attempt} attempt(s): {reason}",
            )

    async def _on_dead(self, entry: Entry, reason: str) -> None:
        """The entry is given up on, not the delivery: its row stays as it is, and the sweeper
        puts it back on the stream later. A crashing handler or a long outage must not turn
        someone's notification into a permanent failure."""
        if self._alerts is not None:
            self._alerts.raise_alert(
                f"dead-letter:{self.channel}",
                f"notifyd: {self.channel} entries are being dead-lettered",
                f"An entry of {self.consumer.stream} was dead-lettered ({reason}). Its "
                "notification stays in PostgreSQL and is re-enqueued by the sweeper; the "
                "dead-letter stream and the log say what keeps failing.",
            )
