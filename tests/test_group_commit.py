"""GroupCommit against real PostgreSQL: concurrent writes share transactions, a lone write
goes at once, and one bad row fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from notifyd.store.batch import CommitTimeout, GroupCommit
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    await created.execute("CREATE TABLE gc_items (n int PRIMARY KEY)")
    yield created
    await created.close()


class Recorder:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.batches: list[list[int]] = []

    async def flush(self, items: Sequence[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany("INSERT INTO gc_items (n) VALUES ($1)", [(n,) for n in items])
        return [n * 10 for n in items]


async def test_concurrent_writes_share_transactions_and_each_gets_its_own_answer(
    pool: asyncpg.Pool,
) -> None:
    recorder = Recorder(pool)
    commit: GroupCommit[int, int] = GroupCommit(recorder.flush, max_batch=16, max_concurrent=2)
    answers = await asyncio.gather(*(commit.submit(n) for n in range(200)))
    assert answers == [n * 10 for n in range(200)]
    assert await pool.fetchval("SELECT count(*) FROM gc_items") == 200
    assert sorted(n for batch in recorder.batches for n in batch) == list(range(200))
    assert max(len(b) for b in recorder.batches) == 16
    assert len(recorder.batches) < 200 / 4  # shared, not one transaction per write


async def test_a_lone_write_is_flushed_at_once(pool: asyncpg.Pool) -> None:
    recorder = Recorder(pool)
    commit: GroupCommit[int, int] = GroupCommit(recorder.flush)
    assert await asyncio.wait_for(commit.submit(7), timeout=5) == 70
    assert recorder.batches == [[7]]


async def test_a_bad_row_fails_only_its_caller(pool: asyncpg.Pool) -> None:
    await pool.execute("INSERT INTO gc_items (n) VALUES (13)")  # 13 will break the key
    recorder = Recorder(pool)
    commit: GroupCommit[int, int] = GroupCommit(recorder.flush, max_batch=64, max_concurrent=1)
    results = await asyncio.gather(
        *(commit.submit(n) for n in range(10, 20)), return_exceptions=True
    )
    failed = [n for n, r in zip(range(10, 20), results, strict=True) if isinstance(r, Exception)]
    assert failed == [13]
    assert isinstance(results[3], asyncpg.UniqueViolationError)
    stored = await pool.fetch("SELECT n FROM gc_items ORDER BY n")
    assert [r["n"] for r in stored] == list(range(10, 20))


async def test_a_cancelled_flush_does_not_leave_callers_waiting(pool: asyncpg.Pool) -> None:
    started = asyncio.Event()

    async def hang(items: Sequence[int]) -> list[int | BaseException]:
        started.set()
        await asyncio.sleep(3600)
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(hang)
    waiter = asyncio.create_task(commit.submit(1))
    await started.wait()
    for task in asyncio.all_tasks():
        if task.get_name() == "group-commit":
            task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, timeout=5)


async def test_concurrent_sends_over_rest_are_each_stored_audited_and_enqueued(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory()
    async with Api(daemon) as api:

        async def send(n: int) -> str:
            status, body, _ = await api.post(
                "/notifications/send/",
                {"notification_type": "in_app", "recipient": f"u{n % 7}", "message": f"m{n}"},
                user="backend",
                role="service",
            )
            assert status == 202, body
            return str(body["notification_id"])

        ids = await asyncio.gather(*(send(n) for n in range(300)))
    assert len(set(ids)) == 300
    assert await db.fetchval("SELECT count(*) FROM notifications") == 300
    audited = await db.fetchval(
        "SELECT count(DISTINCT details->>'notification_id') FROM audit_log "
        "WHERE action = 'notification.send'"
    )
    assert audited == 300

    async def all_delivered() -> bool:  # so every intent reached the stream
        sent = await db.fetchval("SELECT count(*) FROM notifications WHERE status = 'sent'")
        return bool(sent == 300)

    await wait_for(all_delivered, timeout=30)


async def test_a_write_submitted_as_the_last_flush_ends_is_not_stranded() -> None:
    """A caller woken by the flush itself (its continuation runs right after the flushing
    task's last step, before that task's done-callbacks) submits while the only flusher has
    finished but still counted as running. It must be flushed, not left waiting forever."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    batches: list[list[int]] = []

    async def flush(items: Sequence[int]) -> list[int | BaseException]:
        batches.append(list(items))
        if not woken.done():
            woken.set_result(None)  # wakes `later` after this task's final step
        return list(items)

    commit: GroupCommit[int, int] = GroupCommit(flush, max_batch=8, max_concurrent=1)

    async def later() -> int:
        await woken
        return await commit.submit(2)

    second = asyncio.create_task(later())
    assert await commit.submit(1) == 1
    assert await asyncio.wait_for(second, timeout=2) == 2
    assert batches == [[1], [2]]


async def test_a_caller_gives_up_at_the_deadline_and_a_queued_item_is_never_written(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """The promise (issue 24, "every wait has a deadline"): with a timeout, a caller whose
    batch hangs (here: its row waits for a lock another transaction holds) gets
    CommitTimeout instead of waiting forever. Its batch was being written, so it may still
    commit (written=True), and does once the lock goes. A caller still queued behind the
    hung batch is taken out of the queue at its deadline (written=False) and its item is
    never written."""
    blocker = await asyncpg.connect(database_url)
    try:
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("INSERT INTO gc_items (n) VALUES (1)")  # uncommitted: a lock
        recorder = Recorder(pool)
        commit: GroupCommit[int, int] = GroupCommit(
            recorder.flush, max_batch=64, max_concurrent=1, timeout=0.3
        )
        first = asyncio.create_task(commit.submit(1))
        await wait_for(lambda: recorder.batches == [[1]])  # its flush waits for the lock
        second = asyncio.create_task(commit.submit(2))  # queued behind the hung flush
        with pytest.raises(CommitTimeout) as in_flight:
            await asyncio.wait_for(first, timeout=5)
        assert in_flight.value.written is True
        with pytest.raises(CommitTimeout) as queued:
            await asyncio.wait_for(second, timeout=5)
        assert queued.value.written is False
        await holding.rollback()
    finally:
        await blocker.close()

    async def settled() -> bool:
        return await pool.fetchval("SELECT array_agg(n ORDER BY n) FROM gc_items") == [1]

    await wait_for(settled)  # the given-up row 1 committed after all; row 2 never will
    await asyncio.sleep(0)
    assert recorder.batches == [[1]]
    assert await commit.submit(3) == 30  # the queue still works
    assert recorder.batches == [[1], [3]]


async def test_answered_writes_hold_no_deadline_and_the_deadline_still_fires_later(
    pool: asyncpg.Pool,
) -> None:
    """The callers' deadlines share one timer: a write that got its answer leaves nothing
    behind (under steady load the deadline queue would otherwise keep every item and its
    answer until the oldest deadline passed), and a caller submitting after a quiet spell
    still gets its deadline."""
    lock = await pool.acquire()
    recorder = Recorder(pool)
    commit: GroupCommit[int, int] = GroupCommit(
        recorder.flush, max_batch=8, max_concurrent=2, timeout=0.5
    )
    try:
        for round_ in range(5):
            await asyncio.gather(*(commit.submit(round_ * 100 + n) for n in range(50)))
            assert len(commit._deadlines) == 0
        await asyncio.sleep(0.6)  # the first timer fires on an empty queue and stops
        async with lock.transaction():
            await lock.execute("LOCK TABLE gc_items IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(CommitTimeout):
                await asyncio.wait_for(commit.submit(999), timeout=5)
    finally:
        await pool.release(lock)
