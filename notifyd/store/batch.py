"""Group commit: the writes of concurrent callers share one transaction and one round trip.

A caller hands its item to `GroupCommit.submit` and awaits its own result. When no flush is
running, one starts at once with whatever is waiting, so a lone write costs what it did
before; while a flush runs, later items gather and go together in the next one. Under load a
batch fills up to `max_batch`, and the cost of a transaction (BEGIN, COMMIT, the fsync, the
round trips) is paid once per batch instead of once per write. Each caller still returns only
after *its* row is committed: the durability promise is unchanged.

If a batch fails, its items are retried one by one, so one bad row (a constraint it breaks)
fails only its own caller, not the others that happened to share its batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 64,
        max_concurrent: int = 2,
    ) -> None:
        """`flush` writes a batch and returns one result (or the exception for that item)
        per item, in order. `max_concurrent` flushes may run at once (each on its own
        connection), so a slow commit does not stall everyone behind it."""
        self._flush = flush
        self._max_batch = max_batch
        self._max_concurrent = max_concurrent
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._running) < self._max_concurrent:
            task = asyncio.create_task(self._drain(), name="group-commit")
            self._running.add(task)
            # a task cancelled before its first step never runs `_drain`'s own discard
            task.add_done_callback(self._running.discard)
        return await future

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
            if len(batch) > 1:
                for one in batch:
                    await self._write([one])  # isolate the item at fault
                return
            results = [exc]
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller went away (cancelled); its row may still be in
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
