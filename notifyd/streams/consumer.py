"""The one consumer loop every stream actor uses: read, handle, acknowledge, recover.

- `XREADGROUP` with a block timeout for new entries; handled entries are `XACK`ed only after
  the handler returned, i.e. after its outcome is stored.
- On start and every `claim_every` seconds, `XAUTOCLAIM` takes over entries idle longer than
  `claim_idle_ms` (a crashed or stuck peer's work), following the cursor to `0-0`.
- An entry delivered more than `max_deliveries` times, or one the handler declares `Poison`,
  goes to the dead-letter stream with the reason and is acknowledged, so it cannot block the
  group forever.
- A handler that stored its outcome and acked the entry in one script call (a batch of
  entries set aside on the timer wheel) raises `Acknowledged`: the entry is not acked twice.
- A handler exception leaves the entry pending: it is retried after `claim_idle_ms`.
  Redis errors propagate so the supervisor restarts the actor with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.metrics import Metrics
from notifyd.settings import Settings
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.streams")


@dataclass(frozen=True, slots=True)
class Entry:
    stream: str
    id: bytes
    fields: dict[bytes, bytes]
    deliveries: int


class Poison(Exception):
    """The entry can never be handled (malformed, unknown version): dead-letter it now."""


class Defer(Exception):
    """Not now, and not a failure: leave the entry pending (a live peer holds the work)."""


class Acknowledged(Exception):
    """Handled, and the handler acknowledged the entry itself, in the same atomic step that
    stored its outcome (one script call for a whole batch): do not XACK it again."""


@dataclass(frozen=True, slots=True)
class Timing:
    """How a consumer waits and recovers; the same for every stream actor."""

    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    claim_every: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Timing:
        return cls(
            block_ms=max(1, int(settings.stream_block * 1000)),
            claim_idle_ms=int(settings.claim_idle * 1000),
            # takeover within about half the lease after a peer died
            claim_every=min(5.0, settings.claim_idle / 2),
        )


Handler = Callable[[Entry], Awaitable[None]]
# Handles what one read returned, all at once (one statement for many entries); it
# dead-letters an entry it cannot handle itself (`consumer.dead_letter`); raising leaves the
# whole batch pending.
# returns the ids of entries to leave pending (a peer holds their work: Defer), or None
BatchHandler = Callable[[list[Entry]], Awaitable[Collection[bytes] | None]]
DeadHandler = Callable[[Entry, str], Awaitable[None]]
# Per entry: sees each read whole before its entries get a task each, and returns those
# left to the handler; the rest it handled and acknowledged itself, together (a tenant's
# backlog set aside in one script call). Raising ends the loop, as a Redis error does: the
# read entries stay pending and are taken over after claim_idle_ms.
Triage = Callable[[list[Entry]], Awaitable[list[Entry]]]


async def ensure_group(redis: Redis, stream: str, group: str) -> None:
    """Create the group (and the stream) from the beginning; an existing group is fine."""
    try:
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):  # the one error code Redis gives only as text
            raise


async def forget_idle_consumers(redis: Redis, stream: str, group: str, idle_ms: int) -> int:
    """Delete consumers idle longer than `idle_ms` that hold nothing pending.

    Every process restart adds a consumer name (host-pid); without this the group's list
    grows forever. One with pending entries is kept: XAUTOCLAIM hands those out first.
    """
    try:
        consumers: Any = await redis.xinfo_consumers(stream, group)
    except ResponseError:
        return 0  # no such stream or group (yet): nothing to forget
    forgotten = 0
    for consumer in consumers:
        if int(consumer["pending"]) == 0 and int(consumer["idle"]) > idle_ms:
            await redis.xgroup_delconsumer(stream, group, consumer["name"])
            forgotten += 1
    return forgotten


class StreamConsumer:
    def __init__(
        self,
        redis: Redis,
        *,
        stream: str,
        group: str,
        consumer: str,
        handle: Handler | None = None,
        handle_batch: BatchHandler | None = None,
        triage: Triage | None = None,
        dead_letters: str,
        producer: Producer,
        on_dead: DeadHandler | None = None,
        timing: Timing = Timing(),
        concurrency: int = 1,
        batch: int = 16,
        max_deliveries: int = 5,
        metrics: Metrics | None = None,
    ) -> None:
        self._redis = redis
        self._metrics = metrics
        self.stream = stream
        self.group = group
        self.consumer = consumer
        if handle is None and handle_batch is None:
            raise ValueError("a consumer needs handle (per entry) or handle_batch")
        self._handle = handle
        self._handle_batch = handle_batch
        self._triage = triage
        self._dead_letters = dead_letters
        self._producer = producer
        self._on_dead = on_dead
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._batch = batch
        self._block_ms = timing.block_ms
        self._claim_idle_ms = timing.claim_idle_ms
        self._claim_every = timing.claim_every
        self._max_deliveries = max_deliveries

    async def run(self, stop: asyncio.Event) -> None:
        """Keep up to `concurrency` entries in flight; read more as soon as a slot frees.

        On stop, reading ends and in-flight entries are allowed to finish (the supervisor's
        grace bounds that); an entry cut short stays pending and is taken over later.
        """
        await ensure_group(self._redis, self.stream, self.group)
        in_flight: set[asyncio.Task[None]] = set()
        broken: list[BaseException] = []
        # set by every task that ends: a full window waits on this one event, not with
        # `asyncio.wait(in_flight)`, which adds and removes a callback on every task in
        # flight each time (a sender reads hundreds ahead: that was per entry, O(window))
        freed = asyncio.Event()

        def settled(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            freed.set()
            if not task.cancelled():
                error = task.exception()
                if error is not None:
                    broken.append(error)

        next_claim = 0.0
        try:
            while not stop.is_set():
                if broken:
                    raise broken[0]  # Redis trouble in a handler: let the supervisor restart us
                if time.monotonic() >= next_claim:
                    await self.reclaim()
                    next_claim = time.monotonic() + self._claim_every
                free = self._concurrency - len(in_flight)
                if free <= 0:
                    freed.clear()  # nothing awaited since `free` was counted: none missed
                    await freed.wait()
                    continue
                try:
                    response: Any = await self._redis.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.stream: ">"},
                        # per entry: as many as there are free slots; batched: a whole batch
                        count=self._batch if self._handle_batch else min(free, self._batch),
                        block=self._block_ms,
                    )
                except ResponseError as exc:
                    # Redis's error code is the prefix: NOGROUP on the next read, UNBLOCKED for
                    # a read blocked while the stream was deleted
                    if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                        raise
                    # Redis lost the stream and its group (flushed, restarted empty): make
                    # them again; the sweeper re-enqueues the work from PostgreSQL
                    log.warning(
                        "consumer group vanished; recreating", extra={"stream": self.stream}
                    )
                    await ensure_group(self._redis, self.stream, self.group)
                    continue
                for _stream, entries in response or []:
                    fresh = [
                        Entry(self.stream, entry_id, fields, 1)
                        for entry_id, fields in entries
                        if fields is not None
                    ]
                    if self._handle_batch is not None:
                        # one task per read: `concurrency` counts batches in flight
                        work = [self._handle_many(fresh)] if fresh else []
                    else:
                        if self._triage is not None and fresh:
                            fresh = await self._triage(fresh)
                        work = [self._handle_one(entry) for entry in fresh]
                    for job in work:
                        task = asyncio.create_task(job)
                        in_flight.add(task)
                        task.add_done_callback(settled)
        except asyncio.CancelledError:
            # past the grace period: cut in-flight work short; its entries stay pending
            for task in in_flight:
                task.cancel()
            raise
        finally:
            if in_flight:
                await asyncio.wait(in_flight)

    async def reclaim(self) -> int:
        """Take over entries idle past the bound; returns how many were handled."""
        cursor: bytes | str = "0-0"
        handled = 0
        while True:
            reply: Any = await self._redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self._claim_idle_ms,
                start_id=cursor,
                count=self._batch,
            )
            cursor, claimed = reply[0], reply[1]
            entries = []
            for entry_id, fields in claimed:
                if fields is None:  # deleted from the stream meanwhile: nothing to do
                    await self._redis.xack(self.stream, self.group, entry_id)
                    continue
                entries.append(
                    Entry(self.stream, entry_id, fields, await self._deliveries(entry_id))
                )
            if entries:
                log.info(
                    "reclaimed idle entries", extra={"stream": self.stream, "count": len(entries)}
                )
            await self._handle_all(entries)
            handled += len(entries)
            if cursor in (b"0-0", "0-0"):
                return handled

    async def _deliveries(self, entry_id: bytes) -> int:
        pending = await self._redis.xpending_range(
            self.stream, self.group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 1

    async def _handle_all(self, entries: list[Entry]) -> None:
        if not entries:
            return
        if self._handle_batch is not None:
            await self._handle_many(entries)
            return
        async with asyncio.TaskGroup() as group:  # one failing → the rest cancelled, no orphans
            for entry in entries:
                group.create_task(self._handle_one(entry))

    async def _handle_one(self, entry: Entry) -> None:
        async with self._slots:
            if entry.deliveries > self._max_deliveries:
                await self.dead_letter(
                    entry, f"delivered {entry.deliveries} times", cause="redelivered"
                )
                return
            try:
                assert self._handle is not None  # per-entry mode
                await self._handle(entry)
            except Poison as exc:
                await self.dead_letter(entry, str(exc) or type(exc).__name__)
                return
            except Defer as exc:
                log.debug("entry deferred", extra={"stream": self.stream, "reason": str(exc)})
                return
            except Acknowledged:
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # left pending: XAUTOCLAIM hands it out again after claim_idle_ms
                log.exception(
                    "handler failed; entry stays pending",
                    extra={"stream": self.stream, "entry": entry.id.decode()},
                )
                return
            await self._redis.xack(self.stream, self.group, entry.id)

    async def _handle_many(self, entries: list[Entry]) -> None:
        assert self._handle_batch is not None
        async with self._slots:
            live: list[Entry] = []
            for entry in entries:
                if entry.deliveries > self._max_deliveries:
                    await self.dead_letter(
                        entry, f"delivered {entry.deliveries} times", cause="redelivered"
                    )
                else:
                    live.append(entry)
            if not live:
                return
            try:
                deferred = await self._handle_batch(live)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "batch handler failed; its entries stay pending",
                    extra={"stream": self.stream, "entries": len(live)},
                )
                return
            done = [e.id for e in live if not deferred or e.id not in deferred]
            if done:
                await self._redis.xack(self.stream, self.group, *done)

    async def dead_letter(self, entry: Entry, reason: str, *, cause: str = "poison") -> None:
        """`reason` is free text for the entry; `cause` (poison, redelivered) labels the metric,
        a fixed set so its series stay bounded."""
        log.warning(
            "entry dead-lettered",
            extra={"stream": self.stream, "entry": entry.id.decode(), "reason": reason},
        )
        if self._on_dead is not None:
            await self._on_dead(entry, reason)
        fields: dict[bytes | str, bytes | str] = {
            "stream": self.stream,
            "group": self.group,
            "entry": entry.id,
            "reason": reason,
            "deliveries": str(entry.deliveries),
        }
        for key, value in entry.fields.items():
            fields[b"f:" + key] = value
        async with self._redis.pipeline(transaction=True) as pipe:
            self._producer.add_in(pipe, self._dead_letters, fields)
            pipe.xack(self.stream, self.group, entry.id)
            await pipe.execute()
        if self._metrics is not None:
            self._metrics.dead_letters.labels(self.stream, cause).inc()
