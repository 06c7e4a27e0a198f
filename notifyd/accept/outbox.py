"""Where accepted rows go after their commit: their intents on the stream (`announce`), or,
for REST sends, a group commit handed to this process's dispatcher (`Outbox`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
from redis.exceptions import RedisError

from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.payloads import NotificationIntent
from notifyd.store.audit import AuditEntry
from notifyd.store.batch import GroupCommit
from notifyd.store.notifications import NewNotification, insert_many_audited
from notifyd.streams.producer import Producer

log = logging.getLogger("notifyd.accept")


def count_accepted(metrics: Metrics, rows: Sequence[NewNotification]) -> None:
    for channel, count in collections.Counter(row.channel for row in rows).items():
        metrics.notifications_accepted.labels(channel).inc(count)


async def announce(
    producer: Producer,
    keys: Keys,
    rows: Sequence[NewNotification],
    metrics: Metrics | None = None,
    *,
    counted: bool = False,
) -> bool:
    """After the commit: count the rows accepted (unless `counted` already) and put their
    intents on the stream. False when Redis failed; the rows stay queued and the sweeper
    enqueues them later."""
    if metrics is not None and not counted:
        count_accepted(metrics, rows)
    try:
        await producer.add_many(
            [
                (keys.intents, NotificationIntent(row.tenant_id, str(row.id)).to_fields())
                for row in rows
            ]
        )
    except RedisError as exc:
        if metrics is not None:
            metrics.enqueue_failures.inc(len(rows))
        log.warning("intents not enqueued; left for the sweeper", extra={"error": repr(exc)})
        return False
    return True


# (tenant, id) of rows just committed → dispatched by this process (raises when it could not)
DispatchNow = Callable[[Sequence[tuple[str, uuid.UUID]]], Awaitable[None]]


class Outbox:
    """Accepted notifications of concurrent requests, written together.

    Each `put` returns once its row and audit row are committed; rows that arrive while a
    commit is in flight share the next one (`insert_many_audited`: one statement for the rows
    and their audit rows). Under load that turns the round trips per request into round trips
    per batch of up to `max_batch`. Requests that must keep an idempotency record in the same
    transaction do not come here.

    After the commit, the batch goes to this process's dispatcher (`dispatch_now`) instead of
    the intents stream, in the background: the stream hop (XADD, then XREADGROUP, XACK and
    the dispatcher's bookkeeping) was a sizeable share of the daemon's CPU per request. The
    promise is unchanged, because the row is what is durable, not the intent: if this
    process dies before the rows are dispatched they stay `queued`, and any instance's
    sweeper re-enqueues them after `NOTIFYD_REQUEUE_AFTER`. At most `max_in_process`
    batches are dispatched this way at once; past that (the dispatcher falling behind), or
    when a dispatch fails, the intents go on the stream as before and any instance takes
    them.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: Producer,
        keys: Keys,
        metrics: Metrics,
        *,
        max_batch: int = 64,
        writers: int = 2,
        dispatch_now: DispatchNow | None = None,
        max_in_process: int = 4,
        commit_timeout: float | None = None,
    ) -> None:
        self._pool = pool
        self._producer = producer
        self._keys = keys
        self._metrics = metrics
        self._dispatch_now = dispatch_now
        self._max_in_process = max_in_process
        self._in_process: set[asyncio.Task[None]] = set()
        self._closed = False  # after `close`: straight to the stream, nothing left behind
        self._writes: GroupCommit[tuple[NewNotification, AuditEntry], bool] = GroupCommit(
            self._write, max_batch=max_batch, max_concurrent=writers, timeout=commit_timeout
        )

    async def put(self, row: NewNotification, entry: AuditEntry) -> bool:
        """Stores and hands on; False when only the enqueue failed (the sweeper will).

        `CommitTimeout` past `commit_timeout`: the caller answers 503. A row whose batch
        was being written then may still commit, and is then delivered like any other
        (dispatched here, or by the sweeper): not accepted from the caller's view, but never
        stranded."""
        return await self._writes.submit((row, entry))

    async def _write(
        self, items: Sequence[tuple[NewNotification, AuditEntry]]
    ) -> list[bool | BaseException]:
        rows = [row for row, _ in items]
        async with self._pool.acquire() as conn:
            await insert_many_audited(conn, rows, [entry for _, entry in items])
        if self._dispatch_now is not None:
            if self._closed:
                self._metrics.dispatch_fallbacks.labels("closing").inc(len(rows))
            elif len(self._in_process) >= self._max_in_process:
                self._metrics.dispatch_fallbacks.labels("busy").inc(len(rows))
            else:
                count_accepted(self._metrics, rows)
                task = asyncio.create_task(self._dispatch(rows), name="dispatch-in-process")
                self._in_process.add(task)
                task.add_done_callback(self._in_process.discard)
                return [True] * len(rows)
        enqueued = await announce(self._producer, self._keys, rows, self._metrics)
        return [enqueued] * len(rows)

    async def _dispatch(self, rows: list[NewNotification]) -> None:
        assert self._dispatch_now is not None
        try:
            await self._dispatch_now([(row.tenant_id, row.id) for row in rows])
        except Exception as exc:
            log.warning(
                "in-process dispatch failed; the intents go on the stream",
                extra={"count": len(rows), "error": repr(exc)},
            )
            self._metrics.dispatch_fallbacks.labels("failed").inc(len(rows))
            await announce(self._producer, self._keys, rows, self._metrics, counted=True)

    async def close(self, grace: float) -> None:
        """Waits (up to `grace` seconds) for the batches being dispatched here; what is cut
        short stays `queued` (or `dispatched`) for the sweeper. A commit that ends after this
        (a request cut off by the server's own shutdown timeout) puts its intents on the
        stream instead of starting a dispatch nobody waits for."""
        self._closed = True
        if not self._in_process:
            return
        _, pending = await asyncio.wait(set(self._in_process), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
