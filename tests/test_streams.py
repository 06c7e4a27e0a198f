"""The one consumer loop and the timer wheel, against a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from notifyd.actors.timer import Timer
from notifyd.streams.consumer import (
    Acknowledged,
    Defer,
    Entry,
    Poison,
    StreamConsumer,
    Timing,
    ensure_group,
    forget_idle_consumers,
)
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule, Scheduled
from notifyd.streams.trim import Trimmer
from tests.helpers import wait_for

STREAM, GROUP, DEAD = "t:work", "g", "t:dead"
TEN_MS = timedelta(milliseconds=10)


def consumer(redis: Redis, handle: object, **kw: object) -> StreamConsumer:
    timing = Timing(
        block_ms=50,
        claim_every=0.05,
        claim_idle_ms=int(kw.pop("claim_idle_ms", 200)),  # type: ignore[call-overload]
    )
    options: dict[str, object] = {"timing": timing, **kw}
    return StreamConsumer(
        redis,
        stream=STREAM,
        group=GROUP,
        consumer="c1",
        handle=handle,  # type: ignore[arg-type]
        dead_letters=DEAD,
        producer=Producer(redis, 10_000),
        **options,  # type: ignore[arg-type]
    )


async def pending_count(redis: Redis) -> int:
    info = await redis.xpending(STREAM, GROUP)
    return int(info["pending"])


async def run_until(stop: asyncio.Event, loop: StreamConsumer, condition: object) -> None:
    task = asyncio.create_task(loop.run(stop))
    try:
        await wait_for(condition, timeout=10)  # type: ignore[arg-type]
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_entries_are_handled_and_acknowledged_within_the_concurrency_bound(
    redis: Redis,
) -> None:
    """Up to `concurrency` entries run at once, never more: the handlers wait until the
    bound is reached (so it is used, not merely respected), then all go on."""
    handled: list[bytes] = []
    running = 0
    peak = 0
    go_on = asyncio.Event()

    async def handle(entry: Entry) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await go_on.wait()
        handled.append(entry.fields[b"n"])
        running -= 1

    await ensure_group(redis, STREAM, GROUP)
    for n in range(40):
        await redis.xadd(STREAM, {"n": str(n)})
    stop = asyncio.Event()

    async def all_done() -> bool:
        if running >= 4:
            go_on.set()  # the bound is reached: let them all through
        return len(handled) == 40 and await pending_count(redis) == 0

    await run_until(stop, consumer(redis, handle, concurrency=4), all_done)
    assert sorted(int(n) for n in handled) == list(range(40))
    assert peak == 4


async def test_a_failing_handler_leaves_the_entry_pending_until_it_is_reclaimed(
    redis: Redis,
) -> None:
    attempts: list[int] = []

    async def handle(entry: Entry) -> None:
        attempts.append(entry.deliveries)
        if len(attempts) == 1:
            raise RuntimeError("transient trouble")

    await ensure_group(redis, STREAM, GROUP)
    await redis.xadd(STREAM, {"n": "1"})
    stop = asyncio.Event()

    async def handled_twice() -> bool:
        return len(attempts) == 2 and await pending_count(redis) == 0

    await run_until(stop, consumer(redis, handle), handled_twice)
    assert attempts == [1, 2]  # the second delivery knows it is one


async def test_poison_and_too_many_deliveries_go_to_the_dead_letter_stream(redis: Redis) -> None:
    async def handle(entry: Entry) -> None:
        if entry.fields[b"kind"] == b"poison":
            raise Poison("cannot parse")
        raise RuntimeError("always fails")

    await ensure_group(redis, STREAM, GROUP)
    await redis.xadd(STREAM, {"kind": "poison"})
    await redis.xadd(STREAM, {"kind": "flaky"})
    dead_seen: list[str] = []

    async def on_dead(entry: Entry, reason: str) -> None:
        dead_seen.append(reason)

    stop = asyncio.Event()

    async def both_dead() -> bool:
        return await redis.xlen(DEAD) == 2 and await pending_count(redis) == 0

    await run_until(stop, consumer(redis, handle, max_deliveries=2, on_dead=on_dead), both_dead)
    reasons = sorted(fields[b"reason"].decode() for _, fields in await redis.xrange(DEAD))
    assert reasons == ["cannot parse", "delivered 3 times"]
    assert sorted(dead_seen) == reasons
    [(_, first)] = await redis.xrange(DEAD, count=1)
    assert first[b"stream"] == STREAM.encode()
    assert first[b"f:kind"] in (b"poison", b"flaky")  # the original fields travel along


async def test_deferred_entries_stay_pending_without_counting_as_failures(redis: Redis) -> None:
    seen = 0

    async def handle(entry: Entry) -> None:
        nonlocal seen
        seen += 1
        if seen < 3:
            raise Defer("a live peer holds it")

    await ensure_group(redis, STREAM, GROUP)
    await redis.xadd(STREAM, {"n": "1"})
    stop = asyncio.Event()

    async def done() -> bool:
        return seen == 3 and await pending_count(redis) == 0

    await run_until(stop, consumer(redis, handle, max_deliveries=5), done)
    assert await redis.xlen(DEAD) == 0


async def xack_calls(redis: Redis) -> int:
    stats: Any = await redis.info("commandstats")
    return int(stats.get("cmdstat_xack", {}).get("calls", 0))


async def test_a_read_set_aside_whole_is_stored_and_acked_in_one_script_call(redis: Redis) -> None:
    """Promise (a capped tenant's backlog passed in bulk): a triage that sets a read's
    entries aside stores their wheel entries and acks them in one atomic script call, and
    the consumer neither hands them to the handler nor acks them again; the entry it leaves
    and the one whose handler acked it itself (`Acknowledged`) are each acked once."""
    schedule = Schedule(redis, "t:timer")
    await ensure_group(redis, STREAM, GROUP)
    for n in range(40):
        await redis.xadd(STREAM, {"n": str(n)})
    handled: list[bytes] = []
    due = datetime.now(UTC) + timedelta(hours=1)

    async def triage(entries: list[Entry]) -> list[Entry]:
        aside = [e for e in entries if e.fields[b"n"] not in (b"0", b"1")]
        items = [(Scheduled(STREAM, {"n": e.fields[b"n"].decode()}, key="w"), due) for e in aside]
        await schedule.add_many_acking(items, STREAM, GROUP, [e.id for e in aside])
        return [e for e in entries if e not in aside]

    async def handle(entry: Entry) -> None:
        handled.append(entry.fields[b"n"])
        if entry.fields[b"n"] == b"1":
            await redis.xack(STREAM, GROUP, entry.id)  # as a script of its own would
            raise Acknowledged

    before = await xack_calls(redis)
    stop = asyncio.Event()

    async def done() -> bool:
        return len(handled) == 2 and await pending_count(redis) == 0

    await run_until(stop, consumer(redis, handle, triage=triage, batch=64, concurrency=64), done)
    assert sorted(handled) == [b"0", b"1"]
    assert len(await schedule.pending()) == 38  # every entry set aside is on the wheel
    assert await xack_calls(redis) - before == 3  # the script's, entry 0's, entry 1's own
    assert await redis.xlen(DEAD) == 0


async def test_entries_deleted_while_pending_are_acknowledged_on_reclaim(redis: Redis) -> None:
    await ensure_group(redis, STREAM, GROUP)
    entry_id = await redis.xadd(STREAM, {"n": "1"})
    await redis.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=1)  # read, never acked
    await redis.xdel(STREAM, entry_id)
    handled: list[Entry] = []

    async def handle(entry: Entry) -> None:
        handled.append(entry)

    loop = consumer(redis, handle, claim_idle_ms=0)
    assert await loop.reclaim() == 0
    assert handled == []
    assert await pending_count(redis) == 0


async def test_the_wheel_moves_each_due_entry_once_even_with_racing_movers(redis: Redis) -> None:
    schedule = Schedule(redis, "t:timer")
    now = datetime.now(UTC)
    for n in range(300):
        await schedule.add(Scheduled(STREAM, {"n": str(n)}, key="k"), now - timedelta(seconds=1))
    await schedule.add(Scheduled(STREAM, {"n": "later"}, key="k"), now + timedelta(hours=1))
    moved = await asyncio.gather(*(schedule.move_due(now, 50) for _ in range(12)))
    assert sum(moved) == 300
    entries = await redis.xrange(STREAM)
    assert sorted(int(f[b"n"]) for _, f in entries) == list(range(300))
    assert [item.fields["n"] for item, _ in await schedule.pending()] == ["later"]


async def test_the_timer_moves_entries_ahead_in_chunks_never_more_than_its_lookahead(
    redis: Redis,
) -> None:
    """With a lookahead the timer moves what falls due within it, in chunks: an entry is
    moved early, never more than the lookahead early, and a move carries many entries rather
    than one. (How early on average, half the lookahead by design, is a timing figure for the
    reminder benchmarks, not an assertion: on a loaded machine moves come later.)"""
    lookahead = 0.4
    schedule = Schedule(redis, "t:timer")
    start = datetime.now(UTC) + timedelta(seconds=0.6)
    for n in range(120):  # one every 10 ms for 1.2 s
        await schedule.add(Scheduled(STREAM, {"n": str(n)}, key="k"), start + n * TEN_MS)
    stop = asyncio.Event()
    timer = Timer(schedule, lookahead=lookahead, ahead=frozenset({STREAM}))
    task = asyncio.create_task(timer.run(stop))
    try:
        await wait_for(lambda: _length_is(redis, 120), timeout=10, interval=0.01)
    finally:
        stop.set()
        await task
    leads = sorted(await _leads(redis, STREAM))
    assert leads[-1] <= lookahead * 1000 + 1  # never more than the lookahead early
    assert leads[-1] > 0  # the lookahead is used: entries are moved before their time
    # in chunks: one move takes every entry then due within the lookahead (40 of them at one
    # every 10 ms), so its entries share a stream id's millisecond or nearly; a move per
    # entry would leave 120 separate ones. A slow loop only makes the chunks bigger.
    moved_at = sorted(int(entry_id.split(b"-")[0]) for entry_id, _ in await redis.xrange(STREAM))
    moves = 1 + sum(1 for a, b in itertools.pairwise(moved_at) if b - a > 5)
    assert moves <= len(leads) // 4, moved_at


async def test_entries_added_while_the_timer_runs_due_later_still_move_in_chunks(
    redis: Redis,
) -> None:
    """Entries this process schedules seconds ahead, one every 5 ms while the timer runs
    (live workflow triggers), do not wake it each time: it still moves them in chunks, never
    more than the lookahead early; one added due now still moves at once."""
    lookahead = 0.4
    schedule = Schedule(redis, "t:timer")
    stop = asyncio.Event()
    timer = Timer(schedule, lookahead=lookahead, ahead=frozenset({STREAM}))
    task = asyncio.create_task(timer.run(stop))
    try:
        for n in range(200):
            due = datetime.now(UTC) + timedelta(seconds=1)
            await schedule.add(Scheduled(STREAM, {"n": str(n)}, key="k"), due)
            await asyncio.sleep(0.005)
        await wait_for(lambda: _length_is(redis, 200), timeout=10, interval=0.01)
        added = time.monotonic()
        await schedule.add(Scheduled(STREAM, {"n": "now"}, key="k"), datetime.now(UTC))
        await wait_for(lambda: _length_is(redis, 201), timeout=5, interval=0.005)
        prompt = time.monotonic() - added
    finally:
        stop.set()
        await task
    leads = await _leads(redis, STREAM)
    assert max(leads) <= lookahead * 1000 + 1
    moved_at = sorted(int(entry_id.split(b"-")[0]) for entry_id, _ in await redis.xrange(STREAM))
    moves = 1 + sum(1 for a, b in itertools.pairwise(moved_at) if b - a > 5)
    assert moves <= 200 // 4, moved_at  # a move per entry would make 200
    assert prompt < 0.2, prompt  # the timer's longest tick (0.25 s) would be past this


async def test_only_the_streams_that_ask_move_ahead_a_retry_keeps_its_time(redis: Redis) -> None:
    """A retry's due time may be a provider's Retry-After: it never moves early, even on a
    wheel it shares with reminders that do, and the timer wakes for it rather than sleeping
    out its longest tick (a minute here: everything must be moved long before)."""
    lookahead = 0.5
    schedule = Schedule(redis, "t:timer")
    start = datetime.now(UTC) + timedelta(seconds=1)
    await schedule.add_many(  # alternating, one every 20 ms, in one round trip
        [
            (Scheduled(STREAM if n % 2 else "t:own-time", {"n": str(n)}, key="k"), due)
            for n in range(40)
            for due in [start + n * TEN_MS * 2]
        ]
    )
    stop = asyncio.Event()
    timer = Timer(schedule, max_sleep=60, lookahead=lookahead, ahead=frozenset({STREAM}))
    task = asyncio.create_task(timer.run(stop))
    try:

        async def all_moved() -> bool:
            return await redis.xlen(STREAM) + await redis.xlen("t:own-time") == 40

        await wait_for(all_moved, timeout=10, interval=0.01)
    finally:
        stop.set()
        await task

    ahead, own_time = await _leads(redis, STREAM), await _leads(redis, "t:own-time")
    assert len(ahead) == len(own_time) == 20
    assert max(ahead) > 0  # the reminders' stream: moved ahead of its time
    assert max(ahead) <= lookahead * 1000 + 1  # and never more than the lookahead
    # the other: never before its time (a stream id counts whole ms, the due time does not)
    assert max(own_time) < 1


async def _leads(redis: Redis, stream: str) -> list[float]:
    """How far ahead of its due time each entry of `stream` was moved there, in ms."""
    return [
        float(fields[b"due_ms"]) - int(entry_id.split(b"-")[0])
        for entry_id, fields in await redis.xrange(stream)
    ]


async def _length_is(redis: Redis, length: int) -> bool:
    return bool(await redis.xlen(STREAM) == length)


async def test_the_wheel_keeps_an_existing_due_time_when_asked(redis: Redis) -> None:
    schedule = Schedule(redis, "t:timer")
    item = Scheduled(STREAM, {"n": "1"}, key="retry:1")
    first = datetime.now(UTC) + timedelta(seconds=30)
    await schedule.add(item, first)
    await schedule.add(item, first + timedelta(hours=1), only_new=True)
    [(_, score)] = await schedule.pending()
    assert score == pytest.approx(first.timestamp() * 1000, abs=1)
    assert await schedule.next_due_ms() == pytest.approx(first.timestamp() * 1000, abs=1)
    assert await schedule.remove(item)
    assert await schedule.next_due_ms() is None


async def test_every_stream_stays_bounded_by_the_length_setting(redis: Redis) -> None:
    """Approximate trimming (MAXLEN ~) on every XADD: the producer's and the wheel's."""
    producer = Producer(redis, 100)
    for n in range(1_000):
        await producer.add(STREAM, {"n": str(n)})
    assert await redis.xlen(STREAM) < 300  # ~: trimmed in whole nodes, never unbounded
    schedule = Schedule(redis, "t:timer", stream_max_len=100)
    due = datetime.now(UTC) - timedelta(seconds=1)
    for n in range(1_000):
        await schedule.add(Scheduled("t:moved", {"n": str(n)}, key="k"), due)
    assert await schedule.move_due(datetime.now(UTC), 1_000) == 1_000
    assert await redis.xlen("t:moved") < 300


async def test_batch_mode_hands_over_each_read_whole_and_acks_it_after(redis: Redis) -> None:
    batches: list[int] = []
    failed_once = False

    async def handle_one(entry: Entry) -> None:
        raise AssertionError("batch mode never calls the per-entry handler")

    async def handle_batch(entries: list[Entry]) -> None:
        nonlocal failed_once
        if not failed_once:
            failed_once = True
            raise RuntimeError("the whole batch stays pending")
        batches.append(len(entries))

    await ensure_group(redis, STREAM, GROUP)
    for n in range(30):
        await redis.xadd(STREAM, {"n": str(n)})
    loop = consumer(redis, handle_one, handle_batch=handle_batch, batch=10, concurrency=1)
    stop = asyncio.Event()

    async def all_done() -> bool:
        return sum(batches) == 30 and await pending_count(redis) == 0

    await run_until(stop, loop, all_done)
    assert max(batches) <= 10  # one read, one batch
    assert max(batches) > 1  # a read takes a whole batch, not one per free slot


async def test_consumers_of_gone_processes_are_forgotten_but_not_with_work_pending(
    redis: Redis,
) -> None:
    """Every restart adds a consumer name; idle ones holding nothing are removed, one that
    still holds a pending entry is kept (its entry is handed out by XAUTOCLAIM first)."""
    await ensure_group(redis, STREAM, GROUP)
    await redis.xgroup_createconsumer(STREAM, GROUP, "gone-empty")
    await redis.xgroup_createconsumer(STREAM, GROUP, "also-gone")
    await redis.xadd(STREAM, {"n": "1"})
    await redis.xreadgroup(GROUP, "gone-with-work", {STREAM: ">"}, count=1)  # never acked

    async def idle_enough() -> bool:
        consumers = await redis.xinfo_consumers(STREAM, GROUP)
        return all(int(c["idle"]) > 50 for c in consumers)

    await wait_for(idle_enough)
    assert await forget_idle_consumers(redis, STREAM, GROUP, idle_ms=50) == 2
    names = {c["name"] for c in await redis.xinfo_consumers(STREAM, GROUP)}
    assert names == {b"gone-with-work"}
    assert await forget_idle_consumers(redis, "no-such-stream", GROUP, idle_ms=50) == 0


async def test_add_many_keeps_each_entry_on_its_own_stream_in_order(redis: Redis) -> None:
    """One script call for entries bound for several streams, interleaved: each lands on its
    stream with its own fields (text with quotes, non-ASCII, empty values), in call order."""
    producer = Producer(redis, 1_000)
    entries = [
        ("t:a" if n % 3 else "t:b", {"n": str(n), "text": f'"é\\{n}"', "empty": ""})
        for n in range(50)
    ]
    await producer.add_many(entries)
    for stream in ("t:a", "t:b"):
        stored = [
            {k.decode(): v.decode() for k, v in fields.items()}
            for _, fields in await redis.xrange(stream)
        ]
        assert stored == [dict(fields) for s, fields in entries if s == stream]


async def test_add_many_trims_like_add(redis: Redis) -> None:
    producer = Producer(redis, 100)
    for _ in range(10):
        await producer.add_many([(STREAM, {"n": str(n)}) for n in range(100)])
    assert await redis.xlen(STREAM) < 300


async def test_trimming_removes_only_what_every_group_acknowledged(redis: Redis) -> None:
    """Two groups: one has acknowledged everything, the other is behind with work pending (a
    dead consumer's, say). Only entries older than the laggard's oldest pending one go."""
    ids = [await redis.xadd(STREAM, {"n": str(n)}) for n in range(1_000)]
    await redis.xgroup_create(STREAM, "fast", id="0")
    await redis.xgroup_create(STREAM, "slow", id="0")
    read: Any = await redis.xreadgroup("fast", "c", {STREAM: ">"}, count=1_000)
    await redis.xack(STREAM, "fast", *[entry_id for entry_id, _ in read[0][1]])
    await redis.xreadgroup("slow", "c", {STREAM: ">"}, count=600)
    await redis.xack(STREAM, "slow", *ids[:400])  # 400..599 pending, 600.. not read yet

    removed = await Trimmer(redis).trim_acknowledged(STREAM)

    left = [entry_id for entry_id, _ in await redis.xrange(STREAM)]
    assert 0 < removed <= 400  # whole nodes only (MINID ~), never past the oldest pending
    assert len(left) == 1_000 - removed
    assert left[-600:] == ids[400:]  # the pending and the unread are all still there
    # the laggard goes on where it was: its pending entries and the rest are readable
    pending: Any = await redis.xpending(STREAM, "slow")
    assert pending["pending"] == 200 and pending["min"] == ids[400]
    rest: Any = await redis.xreadgroup("slow", "c", {STREAM: ">"}, count=1_000)
    assert [entry_id for entry_id, _ in rest[0][1]] == ids[600:]


async def test_a_stream_without_groups_or_none_at_all_is_left_alone(redis: Redis) -> None:
    trimmer = Trimmer(redis)
    assert await trimmer.trim_acknowledged("t:nothing") == 0
    for n in range(500):
        await redis.xadd(STREAM, {"n": str(n)})
    assert await trimmer.trim_acknowledged(STREAM) == 0
    assert await redis.xlen(STREAM) == 500
    await redis.xgroup_create(STREAM, "new", id="0")  # nothing delivered yet: nothing goes
    assert await trimmer.trim_acknowledged(STREAM) == 0
    assert await redis.xlen(STREAM) == 500


async def test_a_long_acknowledged_backlog_goes_in_one_pass(redis: Redis) -> None:
    """Redis trims at most 10,000 entries a call with `~`; one pass takes them all, so the
    trimming keeps up with a stream that grows faster than that between passes."""
    async with redis.pipeline(transaction=False) as pipe:
        for n in range(25_000):
            pipe.xadd(STREAM, {"n": str(n)})
        await pipe.execute()
    await redis.xgroup_create(STREAM, "all", id="0")
    while await redis.xreadgroup("all", "c", {STREAM: ">"}, count=5_000):
        pass  # read without acknowledging: pending
    pending: Any = await redis.xpending_range(STREAM, "all", "-", "+", 25_000)
    await redis.xack(STREAM, "all", *[p["message_id"] for p in pending])
    removed = await Trimmer(redis).trim_acknowledged(STREAM)
    assert removed >= 24_800  # all but what shares the newest node
    assert await redis.xlen(STREAM) == 25_000 - removed
