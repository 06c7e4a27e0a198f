"""Group commit: the writes of concurrent callers share one transaction and one round trip.

A caller hands its item to `GroupCommit.submit` and awaits its own result. When no flush is
running, one starts at once with whatever is waiting, so a lone write costs what it did
before; while a flush runs, later items gather and go together in the next one. Under load a
batch fills up to `max_batch`, and the cost of a transaction (BEGIN, COMMIT, the fsync, the
round trips) is paid once per batch instead of once per write. Each caller still returns only
after *its* row is committed: the durability promise is unchanged.

If a batch fails, its items are retried one by one, so one bad row (a constraint it breaks)
fails only its own caller, not the others that happened to share its batch. A batch that
failed because PostgreSQL did not answer (a timeout, a lost connection) is not: that is no
row's fault, and retrying 64 rows one at a time against a hung server would hold a flusher
for 64 deadlines.

With a `timeout`, a caller waits that long at most (`CommitTimeout`). An item that had not
left the queue by then is taken out of it: never written. One whose batch was already being
written may still commit after its caller gave up; the caller cannot know, and says so.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import asyncpg

T = TypeVar("T")
R = TypeVar("R")

# The batch failed because the server did not answer, not because of a row in it.
NOT_ANSWERING = (
    TimeoutError,
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
)


class CommitTimeout(TimeoutError):
    """The caller's deadline passed before its batch committed. `written`: False when the
    item never left the queue (it is not stored, and never will be), True when its batch was
    being written (it may still commit)."""

    def __init__(self, seconds: float, *, written: bool) -> None:
        super().__init__(f"not committed within {seconds:g} s")
        self.written = written


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_concurrent: int = 2,
        timeout: float | None = None,
    ) -> None:
        """`flush` writes a batch and returns one result (or the exception for that item)
        per item, in order. `max_concurrent` flushes may run at once (each on its own
        connection), so a slow commit does not stall everyone behind it. `timeout`: the
        longest a caller waits for its result (None: as long as the flush takes)."""
        self._flush = flush
        self._max_batch = max_batch
        self._max_concurrent = max_concurrent
        self._timeout = timeout
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()
        # Every caller's deadline, in submit order (one timeout for all: the order of
        # submits is the order of deadlines), served by one timer armed at the earliest.
        # A timer handle per write, armed and cancelled, was a measurable part of a REST
        # send's cost; here a write costs an append. Entries whose caller has its answer
        # leave from the front after each batch, so the queue holds about what is in flight.
        self._deadlines: collections.deque[tuple[float, tuple[T, asyncio.Future[R]]]] = (
            collections.deque()
        )
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        entry = (item, future)
        self._waiting.append(entry)
        if len(self._running) < self._max_concurrent:
            task = asyncio.create_task(self._drain(), name="group-commit")
            self._running.add(task)
            # a task cancelled before its first step never runs `_drain`'s own discard
            task.add_done_callback(self._running.discard)
        if self._timeout is not None:
            at = loop.time() + self._timeout
            self._deadlines.append((at, entry))
            if self._timer is None:
                self._timer = loop.call_at(at, self._expire_due)
        return await future

    def _expire_due(self) -> None:
        """The timer: every caller whose deadline passed gets CommitTimeout (and `_write`
        skips its future, done, whenever its batch ends); then the timer waits for the next
        deadline of a caller still waiting."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines:
            at, entry = deadlines[0]
            if entry[1].done():
                deadlines.popleft()
            elif at <= now:
                deadlines.popleft()
                self._expire(entry)
            else:
                self._timer = loop.call_at(at, self._expire_due)
                return

    def _expire(self, entry: tuple[T, asyncio.Future[R]]) -> None:
        _, future = entry
        assert self._timeout is not None
        future.set_exception(CommitTimeout(self._timeout, written=not self._forget(entry)))

    def _answered(self) -> None:
        """Drops the deadlines of callers that have their answer from the front: batches end
        about in submit order, so this keeps the queue to what is still waiting."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1][1].done():
            deadlines.popleft()

    def _forget(self, entry: tuple[T, asyncio.Future[R]]) -> bool:
        """Takes `entry` out of the queue; False when a flush had taken it already."""
        for index, waiting in enumerate(self._waiting):
            if waiting is entry:
                del self._waiting[index]
                return True
        return False

    async def _drain(self) -> None:
        task = asyncio.current_task()
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._write(batch)
        finally:
            # Out of the count in the same step as the last look at the queue. The done
            # callback runs a step later, and a caller that submits in between (one woken
            # by this very flush) would find every flusher "running", start none, and wait
            # forever.
            if task is not None:
                self._running.discard(task)

    async def _write(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()  # shutting down: nobody may wait forever
            raise
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, NOT_ANSWERING):
                for one in batch:
                    if not one[1].done():  # a caller that gave up is not written alone
                        await self._write([one])  # isolate the item at fault
                return
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                # the caller went away (cancelled, or its deadline passed); its row may
                # still be in
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        self._answered()
