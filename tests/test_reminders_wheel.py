"""The reminder timer wheel, with real daemons, PostgreSQL and Redis.

Promises checked (each test names its own): a reminder fires at its time, once, with a
measured lateness, also several per interview; reschedule and cancel one second before the
due time take effect (no firing at the old time, the wheel entry moves or goes), and a stale
stream entry of a cancelled reminder is dropped; two instances fire 1,000 reminders due in the
same second exactly once each; reminders that came due while the daemon was down fire on
restart, flagged late, unless the interview itself passed (then `skipped`); a flushed Redis
(while running, or before start) is rebuilt from PostgreSQL and nothing is lost or doubled;
the interview time is written in each recipient's time zone, contacts add email and SMS,
`channels` limits them, bad contacts are a 422 naming the field; `Idempotency-Key` makes one
reminder; opt-outs do not silence a reminder; lateness and outcomes are metrics.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.ids import uuid7
from notifyd.keys import FIRE_GROUP, Keys
from notifyd.reminders import wheel_item
from notifyd.streams.schedule import Schedule
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for, wait_pipeline_idle
from tests.smtp_sink import SmtpSink
from tests.twilio_standin import TwilioStandin

TENANT = "TEN-0001"
SERVICE = "hiring-backend"
KEYS = Keys()
FAST = {
    "NOTIFYD_RETRY_BASE": "0.05",
    "NOTIFYD_RETRY_CAP": "0.5",
    "NOTIFYD_CLAIM_IDLE": "2",
    "NOTIFYD_SEND_TIMEOUT": "1",
    "NOTIFYD_REQUEUE_AFTER": "1",
    "NOTIFYD_SWEEP_INTERVAL": "0.2",
}
SID = "AC" + "5a" * 16
AUTH_TOKEN = "twilio-auth-token-for-reminder-tests"

ROW = """
SELECT status, reminder_time, interview_time, fired_at, late, lateness_ms, notification_ids
FROM interview_reminders WHERE id = $1
"""


def rfc3339(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def soon(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def sleep_until(when: datetime) -> None:
    """Wait for the clock itself (not for work): the point of a test about due times."""
    delay = (when - datetime.now(UTC)).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)


@pytest.fixture
def wheel(redis: Redis) -> Schedule:
    """The timer wheel (`notifyd:timer`), read the way the daemon writes it."""
    return Schedule(redis, KEYS.timer)


async def wheel_scores(wheel: Schedule) -> dict[str, float]:
    """Reminder id → score (due time in epoch ms) of every reminder on the wheel."""
    return {
        item.fields["id"]: score
        for item, score in await wheel.pending()
        if item.stream == KEYS.reminders
    }


async def create(
    api: Api,
    reminder_time: datetime,
    *,
    interview_time: datetime | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> uuid.UUID:
    body: dict[str, Any] = {
        "application_id": "app-1",
        "candidate_id": "cand-1",
        "employer_id": "emp-1",
        "interview_time": rfc3339(interview_time or datetime.now(UTC) + timedelta(hours=2)),
        "reminder_time": rfc3339(reminder_time),
        **extra,
    }
    status, answer, _ = await api.post(
        "/reminders/create/", body, user=SERVICE, role="service", headers=headers
    )
    assert status == 201, answer
    return uuid.UUID(answer["reminder_id"])


async def patch(api: Api, reminder_id: uuid.UUID, **body: str) -> tuple[int, Any]:
    status, answer, _ = await api.request(
        "PATCH", f"/reminders/{reminder_id}/", json=body, user=SERVICE, role="service"
    )
    return status, answer


async def row(db: asyncpg.Connection, reminder_id: uuid.UUID) -> asyncpg.Record:
    record = await db.fetchrow(ROW, reminder_id)
    assert record is not None
    return record


async def wait_status(
    db: asyncpg.Connection, reminder_id: uuid.UUID, status: str, timeout: float = 10
) -> asyncpg.Record:
    async def reached() -> bool:
        return bool((await row(db, reminder_id))["status"] == status)

    await wait_for(reached, timeout=timeout)
    return await row(db, reminder_id)


async def wait_all_sent(db: asyncpg.Connection, expected: int, timeout: float = 15) -> None:
    """Every notification made so far reached the provider (none suppressed or failed)."""

    async def all_sent() -> bool:
        counts = dict(await db.fetch("SELECT status, count(*) FROM notifications GROUP BY 1"))
        return counts == {"sent": expected}

    await wait_for(all_sent, timeout=timeout, interval=0.05)


async def count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    value = await db.fetchval(sql, *args)
    return int(value)


def fired_counter(daemon: Daemon, outcome: str = "fired") -> float:
    value = daemon.metrics.registry.get_sample_value(
        "notifyd_reminders_total", {"outcome": outcome}
    )
    return value or 0.0


# ---------------------------------------------------------------------------------------------
# on time


async def test_each_reminder_of_an_interview_fires_once_at_its_own_time_with_small_lateness(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST)
    interview = soon(3600)
    async with Api(daemon) as api:
        first = await create(api, soon(1), interview_time=interview)
        second = await create(api, soon(2), interview_time=interview)

    one = await wait_status(db, first, "fired")
    assert (await row(db, second))["status"] == "scheduled"  # not dragged along by the first
    two = await wait_status(db, second, "fired")
    for fired in (one, two):
        print(f"lateness_ms={fired['lateness_ms']}")
        assert fired["late"] is False
        assert 0 <= fired["lateness_ms"] < 1000
        # not early either: the wheel moved it at (or after) its time
        assert fired["fired_at"] >= fired["reminder_time"] - timedelta(milliseconds=20)
        assert len(fired["notification_ids"]) == 2
    assert two["fired_at"] - one["fired_at"] > timedelta(milliseconds=500)

    await wait_all_sent(db, 4)
    assert await count(db, "SELECT count(*) FROM notifications WHERE channel = 'in_app'") == 4
    fired_audits = "SELECT count(*) FROM audit_log WHERE action = 'reminder.fired'"
    assert await count(db, fired_audits) == 2
    assert fired_counter(daemon) == 2


# ---------------------------------------------------------------------------------------------
# reschedule and cancel races


async def test_reminder_moved_later_one_second_before_due_does_not_fire_at_the_old_time(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule
) -> None:
    daemon = await daemon_factory(**FAST)
    old_due = soon(1.5)
    async with Api(daemon) as api:
        reminder_id = await create(api, old_due)
        await sleep_until(old_due - timedelta(seconds=1))
        new_due = soon(3600)
        status, answer = await patch(api, reminder_id, reminder_time=rfc3339(new_due))
        assert status == 200, answer
        assert datetime.now(UTC) < old_due, "the PATCH must land before the old due time"

    scores = await wheel_scores(wheel)
    assert scores[str(reminder_id)] == pytest.approx(new_due.timestamp() * 1000, abs=1)

    await sleep_until(old_due + timedelta(seconds=2))
    record = await row(db, reminder_id)
    assert record["status"] == "scheduled"
    assert record["fired_at"] is None
    assert record["notification_ids"] == []
    assert await count(db, "SELECT count(*) FROM notifications") == 0
    # still on the wheel, at the new time
    scores = await wheel_scores(wheel)
    assert scores[str(reminder_id)] == pytest.approx(new_due.timestamp() * 1000, abs=1)


async def test_reminder_moved_earlier_fires_at_the_new_time(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        reminder_id = await create(api, soon(3600))
        new_due = soon(1)
        status, answer = await patch(api, reminder_id, reminder_time=rfc3339(new_due))
        assert status == 200, answer

    fired = await wait_status(db, reminder_id, "fired")
    assert fired["reminder_time"] == new_due
    assert fired["fired_at"] >= new_due - timedelta(milliseconds=20)
    assert fired["late"] is False and fired["lateness_ms"] < 1000
    assert len(fired["notification_ids"]) == 2


async def test_reminder_cancelled_one_second_before_due_never_fires_and_leaves_the_wheel(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule
) -> None:
    daemon = await daemon_factory(**FAST)
    due = soon(1.5)
    async with Api(daemon) as api:
        reminder_id = await create(api, due)
        assert str(reminder_id) in await wheel_scores(wheel)
        await sleep_until(due - timedelta(seconds=1))
        status, answer, _ = await api.request(
            "DELETE", f"/reminders/{reminder_id}/", user=SERVICE, role="service"
        )
        assert status == 204, answer
        assert datetime.now(UTC) < due, "the DELETE must land before the due time"

    assert str(reminder_id) not in await wheel_scores(wheel)
    await sleep_until(due + timedelta(seconds=1.5))
    record = await row(db, reminder_id)
    assert record["status"] == "cancelled"
    assert record["fired_at"] is None and record["notification_ids"] == []
    assert await count(db, "SELECT count(*) FROM notifications") == 0
    assert fired_counter(daemon) == 0


async def test_stale_stream_entry_of_a_cancelled_due_reminder_is_dropped_without_firing(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """The entry left the wheel before the cancel: the firer's guarded UPDATE drops it."""
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        reminder_id = await create(api, soon(3600))
        status, _, _ = await api.request(
            "DELETE", f"/reminders/{reminder_id}/", user=SERVICE, role="service"
        )
        assert status == 204
    # make it due, as if the cancel came just after the timer moved it
    await db.execute(
        "UPDATE interview_reminders SET reminder_time = now() - interval '1 second' WHERE id = $1",
        reminder_id,
    )
    entry_id = await redis.xadd(KEYS.reminders, wheel_item(KEYS, TENANT, reminder_id).fields)

    async def consumed() -> bool:
        groups = await redis.xinfo_groups(KEYS.reminders)
        group = next(g for g in groups if g["name"] == FIRE_GROUP.encode())
        return bool(group["last-delivered-id"] == entry_id and group["pending"] == 0)

    await wait_for(consumed, timeout=10)
    record = await row(db, reminder_id)
    assert record["status"] == "cancelled"
    assert record["fired_at"] is None and record["notification_ids"] == []
    assert await count(db, "SELECT count(*) FROM notifications") == 0
    assert fired_counter(daemon) == 0


async def test_stale_stream_entry_never_fires_a_reminder_moved_slightly_later_before_its_time(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """The timer moved the entry at the old time, then a PATCH moved the reminder 0.8 s later:
    the old entry must not fire it 0.8 s early (the new wheel entry fires it on time)."""
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        reminder_id = await create(api, soon(3600))
        new_due = soon(0.8)
        status, answer = await patch(api, reminder_id, reminder_time=rfc3339(new_due))
        assert status == 200, answer
    entry_id = await redis.xadd(KEYS.reminders, wheel_item(KEYS, TENANT, reminder_id).fields)

    async def consumed() -> bool:
        groups = await redis.xinfo_groups(KEYS.reminders)
        group = next(g for g in groups if g["name"] == FIRE_GROUP.encode())
        return bool(group["last-delivered-id"] >= entry_id and group["pending"] == 0)

    await wait_for(consumed, timeout=10)
    fired = await wait_status(db, reminder_id, "fired")
    assert fired["fired_at"] >= new_due - timedelta(milliseconds=20), (
        f"fired {(new_due - fired['fired_at']).total_seconds():.3f} s before its time"
    )


# ---------------------------------------------------------------------------------------------
# read ahead (NOTIFYD_REMINDER_LOOKAHEAD)

AHEAD = {**FAST, "NOTIFYD_REMINDER_LOOKAHEAD": "1.5"}  # below FAST's claim idle (2 s)


async def read_by_firer(redis: Redis, count: int) -> bool:
    """`count` reminder entries read by the firer and not yet acknowledged: waiting for their
    time."""
    groups = await redis.xinfo_groups(KEYS.reminders)
    group = next((g for g in groups if g["name"] == FIRE_GROUP.encode()), None)
    # None: the firer has not made its group yet (a daemon just started): not read yet
    return group is not None and bool(group["pending"] == count)


async def test_a_reminder_read_ahead_of_its_time_fires_at_its_time_not_when_read(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule, redis: Redis
) -> None:
    daemon = await daemon_factory(**AHEAD)
    due = soon(4)
    async with Api(daemon) as api:
        reminder_id = await create(api, due)
    await wait_for(lambda: read_by_firer(redis, 1), timeout=5, interval=0.01)
    assert str(reminder_id) not in await wheel_scores(wheel)
    assert datetime.now(UTC) < due - timedelta(seconds=0.75), "it left the wheel ahead of time"
    assert (await row(db, reminder_id))["status"] == "scheduled"

    fired = await wait_status(db, reminder_id, "fired")
    assert fired["fired_at"] >= fired["reminder_time"], "fired before its time"
    assert fired["lateness_ms"] < 1000 and fired["late"] is False
    assert len(fired["notification_ids"]) == 2
    await wait_for(lambda: read_by_firer(redis, 0), timeout=5)  # acknowledged once fired


async def test_a_reminder_read_ahead_then_moved_later_or_cancelled_does_not_fire_then(
    daemon_factory: DaemonFactory,
    db: asyncpg.Connection,
    wheel: Schedule,
    redis: Redis,
    database_url: str,
) -> None:
    """The firer read and planned both while they waited for their time; the PATCH and the
    DELETE land in between, and its statement's guard refuses the old plan.

    "In between" is made certain: the wave's statement is held back by a lock on
    `notifications` (it inserts there, so it waits before it reads a row) until the changes
    are made; seeing the statement wait proves the batch was read and planned before them.
    (Waiting for the stream read alone did not: the batch's read of the rows follows it, and
    when it came after the PATCH the plan left the moved reminder out, so the statement's
    own guard went untested.)"""
    daemon = await daemon_factory(**AHEAD, NOTIFYD_DB_POOL_MAX="10")
    due = soon(3)
    async with Api(daemon) as api:
        moved = await create(api, due, application_id="app-moved")
        cancelled = await create(api, due, application_id="app-cancelled")
        await wait_for(lambda: read_by_firer(redis, 2), timeout=5, interval=0.01)
        locker = await asyncpg.connect(database_url)
        try:
            holding = locker.transaction()
            await holding.start()
            await locker.execute("LOCK TABLE notifications IN EXCLUSIVE MODE")
            await wait_for(lambda: statements_waiting(db, "WITH input AS", 1), timeout=10)
            new_due = soon(3600)
            status, answer = await patch(api, moved, reminder_time=rfc3339(new_due))
            assert status == 200, answer
            status, _, _ = await api.request(
                "DELETE", f"/reminders/{cancelled}/", user=SERVICE, role="service"
            )
            assert status == 204
            await holding.rollback()  # the wave's statement runs with the old plan
        finally:
            await locker.close()

    await wait_for(lambda: read_by_firer(redis, 0), timeout=5)
    assert (await row(db, moved))["status"] == "scheduled"
    assert (await row(db, cancelled))["status"] == "cancelled"
    assert await count(db, "SELECT count(*) FROM notifications") == 0
    assert fired_counter(daemon) == 0
    scores = await wheel_scores(wheel)
    assert scores == {str(moved): pytest.approx(new_due.timestamp() * 1000, abs=1)}


# ---------------------------------------------------------------------------------------------
# several instances


async def test_two_instances_fire_1000_reminders_due_in_the_same_second_exactly_once(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule
) -> None:
    total = 1000
    daemons = [
        await daemon_factory(NOTIFYD_INSTANCE_NAME=name, NOTIFYD_DB_POOL_MAX="10", **FAST)
        for name in ("wheel-a", "wheel-b")
    ]
    due = soon(3)
    interview = soon(3600)
    ids = [uuid7() for _ in range(total)]
    await db.copy_records_to_table(
        "interview_reminders",
        columns=[
            "id",
            "tenant_id",
            "application_id",
            "candidate_id",
            "employer_id",
            "created_by",
            "interview_time",
            "reminder_time",
        ],
        records=[
            (rid, TENANT, f"app-{i}", f"cand-{i}", f"emp-{i}", SERVICE, interview, due)
            for i, rid in enumerate(ids)
        ],
    )
    await wheel.add_many([(wheel_item(KEYS, TENANT, rid), due) for rid in ids])
    assert datetime.now(UTC) < due, "the reminders must be on the wheel before they are due"

    async def all_fired() -> bool:
        fired = "SELECT count(*) FROM interview_reminders WHERE status = 'fired'"
        return await count(db, fired) == total

    await wait_for(all_fired, timeout=30, interval=0.1)
    stats = await db.fetchrow(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lateness_ms) AS p50, "
        "percentile_cont(0.99) WITHIN GROUP (ORDER BY lateness_ms) AS p99, "
        "max(lateness_ms) AS max FROM interview_reminders"
    )
    per_instance = [fired_counter(d) for d in daemons]
    print(
        f"\n{total} reminders, 2 instances: lateness p50={stats['p50']:.0f} ms "
        f"p99={stats['p99']:.0f} ms max={stats['max']} ms; fired per instance {per_instance}"
    )
    assert stats["max"] < 10_000

    await wait_all_sent(db, 2 * total, timeout=30)
    assert await count(db, "SELECT count(*) FROM notifications WHERE channel = 'in_app'") == 2000
    # exactly two per reminder, one to each side, and one fired transition each
    assert (
        await count(
            db,
            "SELECT count(*) FROM interview_reminders WHERE cardinality(notification_ids) <> 2",
        )
        == 0
    )
    assert (
        await count(
            db,
            "SELECT count(*) FROM (SELECT user_id FROM notifications GROUP BY user_id "
            "HAVING count(*) <> 1) AS doubled",
        )
        == 0
    )
    assert await count(db, "SELECT count(DISTINCT user_id) FROM notifications") == 2 * total
    fired_audits = "SELECT count(*) FROM audit_log WHERE action = 'reminder.fired'"
    assert await count(db, fired_audits) == total
    assert sum(per_instance) == total
    assert await wheel_scores(wheel) == {}


# ---------------------------------------------------------------------------------------------
# the same entry twice, and a takeover after a crash: the guarded UPDATE is the exactly-once
# point, not the consumer group (which hands each entry to one instance, so two instances
# alone never compete for a reminder)


async def insert_due(db: asyncpg.Connection, due: datetime, count: int = 1) -> list[uuid.UUID]:
    """Scheduled reminders due at `due`, in PostgreSQL only (no wheel member): the test
    puts their stream entries on `notifyd:reminders` itself."""
    ids = [uuid7() for _ in range(count)]
    await db.executemany(
        "INSERT INTO interview_reminders (id, tenant_id, application_id, candidate_id, "
        "employer_id, created_by, interview_time, reminder_time) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            (
                rid,
                TENANT,
                f"app-{i}",
                f"cand-{i}",
                f"emp-{i}",
                SERVICE,
                due + timedelta(hours=1),
                due,
            )
            for i, rid in enumerate(ids)
        ],
    )
    return ids


async def deliver(redis: Redis, reminder_id: uuid.UUID, due: datetime) -> None:
    """The entry the timer's move makes for this reminder (`due_ms`: the time it was moved
    for); adding it again is a redelivery of the same due entry."""
    fields = {**wheel_item(KEYS, TENANT, reminder_id).fields, "due_ms": str(due.timestamp() * 1000)}
    await redis.xadd(KEYS.reminders, fields)


async def settled_counts(db: asyncpg.Connection, redis: Redis) -> tuple[int, int]:
    """(notifications, `reminder.fired` audit rows) once the pipeline is idle."""
    await wait_pipeline_idle(redis, db, KEYS)
    notifications = await count(db, "SELECT count(*) FROM notifications")
    audits = await count(db, "SELECT count(*) FROM audit_log WHERE action = 'reminder.fired'")
    return notifications, audits


async def test_the_same_due_entry_delivered_twice_fires_once(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis
) -> None:
    """Two copies of one due entry, read in two batches before the due time (as a replay or
    an XAUTOCLAIM of a slow peer's entry would be): both batches read the reminder while it
    was still scheduled, both fire their wave at its time; only the statement's guard
    (`status = 'scheduled'` in FIRE_MANY) keeps the second from firing it again."""
    daemon = await daemon_factory(**FAST)
    due = soon(2)
    [reminder_id] = await insert_due(db, due)
    await deliver(redis, reminder_id, due)
    await wait_for(lambda: read_by_firer(redis, 1), timeout=5, interval=0.01)
    await deliver(redis, reminder_id, due)
    await wait_for(lambda: read_by_firer(redis, 2), timeout=5, interval=0.01)
    assert datetime.now(UTC) < due, "both copies must be read before the due time"

    fired = await wait_status(db, reminder_id, "fired")
    assert await settled_counts(db, redis) == (2, 1)
    assert len(fired["notification_ids"]) == 2
    assert fired_counter(daemon) == 1


async def statements_waiting(db: asyncpg.Connection, prefix: str, least: int) -> bool:
    """At least `least` statements starting with `prefix` wait for a lock."""
    found = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND ltrim(query, E' \\n') LIKE $1 || '%'",
        prefix,
    )
    return int(found) >= least


async def test_the_same_due_entry_twice_fires_once_when_the_reminder_changed_before_its_wave(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis, database_url: str
) -> None:
    """As above, and the interview moves (a PATCH) just before the waves: both waves'
    statements refuse their old plan, and each batch reads the reminder again and fires it on
    its own (FIRE), where the guard is FIRE's `status = 'scheduled'`.

    The interleaving is forced with locks: the waves wait for a table lock on `notifications`
    (each firing statement inserts there, so it waits before it reads a row) while the
    interview moves; then the test holds the reminder's row until every batch has read it
    again, still scheduled, and its FIRE waits for the row; then they go at once."""
    daemon = await daemon_factory(
        **{**FAST, "NOTIFYD_REQUEUE_AFTER": "60", "NOTIFYD_CLAIM_IDLE": "30"},
        NOTIFYD_DB_POOL_MAX="10",
    )
    due = soon(2)
    [reminder_id] = await insert_due(db, due)
    await deliver(redis, reminder_id, due)
    await wait_for(lambda: read_by_firer(redis, 1), timeout=5, interval=0.01)
    await deliver(redis, reminder_id, due)
    await wait_for(lambda: read_by_firer(redis, 2), timeout=5, interval=0.01)
    table, row_lock = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        holding_table = table.transaction()
        await holding_table.start()
        await table.execute("LOCK TABLE notifications IN EXCLUSIVE MODE")
        assert datetime.now(UTC) < due, "both copies must be read before the due time"
        await wait_for(lambda: statements_waiting(db, "WITH input AS", 2), timeout=10)
        await db.execute(
            "UPDATE interview_reminders SET interview_time = interview_time + interval '1 hour'"
            ", updated_at = now() WHERE id = $1 AND status = 'scheduled'",
            reminder_id,
        )
        holding_row = row_lock.transaction()
        await holding_row.start()
        await row_lock.execute(
            "SELECT 1 FROM interview_reminders WHERE id = $1 FOR UPDATE", reminder_id
        )
        await holding_table.rollback()  # the waves run, refuse, and each batch reads it again
        await wait_for(lambda: statements_waiting(db, "WITH fired AS", 2), timeout=10)
        await holding_row.rollback()  # every FIRE at once
    finally:
        await table.close()
        await row_lock.close()

    fired = await wait_status(db, reminder_id, "fired")
    assert fired["interview_time"] == due + timedelta(hours=2)  # planned with the new time
    assert await settled_counts(db, redis) == (2, 1)
    assert fired_counter(daemon) == 1


async def test_reminders_read_ahead_by_a_killed_instance_are_taken_over_and_fire_once(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis, wheel: Schedule
) -> None:
    """Instance A reads three reminders ahead of their time (NOTIFYD_REMINDER_LOOKAHEAD) and
    dies holding them (its actors cancelled: nothing acknowledged, as after kill -9). B takes
    the entries over once they are idle past NOTIFYD_CLAIM_IDLE and fires each once. The
    sweeper's overdue re-add is pushed out of the test's reach (NOTIFYD_REQUEUE_AFTER), so
    only the takeover can fire them: an entry acknowledged before its reminder fired would be
    lost here."""
    env = {**AHEAD, "NOTIFYD_REQUEUE_AFTER": "60"}
    first = await daemon_factory(NOTIFYD_INSTANCE_NAME="ahead-a", **env)
    due = soon(3)
    async with Api(first) as api:
        ids = [await create(api, due, application_id=f"app-{i}") for i in range(3)]
    await wait_for(lambda: read_by_firer(redis, 3), timeout=5, interval=0.01)
    holders: Any = await redis.xpending(KEYS.reminders, FIRE_GROUP)
    assert [(c["name"], c["pending"]) for c in holders["consumers"]] == [(b"ahead-a", 3)]
    assert await wheel_scores(wheel) == {}, "all three left the wheel for A's batch"
    assert first.supervisor is not None
    await first.supervisor.stop(0)  # killed: its batch is cut short, nothing acknowledged
    assert datetime.now(UTC) < due, "A must die holding reminders not yet due"
    await wait_for(lambda: read_by_firer(redis, 3), timeout=2)

    second = await daemon_factory(NOTIFYD_INSTANCE_NAME="ahead-b", **env)
    for reminder_id in ids:
        fired = await wait_status(db, reminder_id, "fired", timeout=15)
        assert len(fired["notification_ids"]) == 2
    assert await settled_counts(db, redis) == (6, 3)
    assert fired_counter(first) == 0
    assert fired_counter(second) == 3


# ---------------------------------------------------------------------------------------------
# restarts and lost Redis data


async def test_reminders_due_while_the_daemon_was_down_fire_late_on_restart_or_are_skipped(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    env = {**FAST, "NOTIFYD_REMINDER_LATE_AFTER": "1"}
    first = await daemon_factory(**env)
    due = soon(1.5)  # about 1 s, with room for the stop itself
    async with Api(first) as api:
        late = await create(api, due)
        passed = await create(api, due)
    await first.stop()
    assert (await row(db, late))["status"] == "scheduled", "fired before the daemon stopped"
    # while it is down, the second interview begins (reminder still before it)
    await db.execute(
        "UPDATE interview_reminders SET reminder_time = now() - interval '3 seconds', "
        "interview_time = now() - interval '1 second' WHERE id = $1",
        passed,
    )
    await sleep_until(due + timedelta(seconds=2))

    second = await daemon_factory(**env)
    fired = await wait_status(db, late, "fired")
    skipped = await wait_status(db, passed, "skipped")
    assert fired["late"] is True
    assert fired["lateness_ms"] >= 1000
    assert len(fired["notification_ids"]) == 2
    assert skipped["notification_ids"] == []
    await wait_all_sent(db, 2)
    assert await count(db, "SELECT count(*) FROM notifications") == 2
    assert fired_counter(second) == 1
    assert fired_counter(second, "skipped") == 1


async def test_redis_flushed_while_running_the_wheel_is_rebuilt_and_the_reminder_fires_once(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis, wheel: Schedule
) -> None:
    daemon = await daemon_factory(**FAST)
    due = soon(3)
    async with Api(daemon) as api:
        reminder_id = await create(api, due)
    await redis.flushall()
    assert await wheel_scores(wheel) == {}

    async def rebuilt() -> bool:
        return str(reminder_id) in await wheel_scores(wheel)

    await wait_for(rebuilt, timeout=2)
    assert datetime.now(UTC) < due, "rebuilt only after it was due"
    assert (await wheel_scores(wheel))[str(reminder_id)] == pytest.approx(
        due.timestamp() * 1000, abs=1
    )

    fired = await wait_status(db, reminder_id, "fired", timeout=15)
    assert fired["late"] is False
    assert len(fired["notification_ids"]) == 2
    await wait_all_sent(db, 2, timeout=20)  # the consumer groups came back too
    fired_audits = "SELECT count(*) FROM audit_log WHERE action = 'reminder.fired'"
    assert await count(db, fired_audits) == 1
    assert await count(db, "SELECT count(*) FROM notifications") == 2
    assert fired_counter(daemon) == 1
    restarts = {
        s.labels["actor"]: s.value
        for metric in daemon.metrics.registry.collect()
        for s in metric.samples
        if s.name == "notifyd_actor_restarts_total"
    }
    # the consumers recreate their groups: losing Redis's data is not an actor crash
    assert restarts == {}, restarts


async def test_redis_flushed_before_start_the_wheel_is_rebuilt_on_start(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, redis: Redis, wheel: Schedule
) -> None:
    first = await daemon_factory(**FAST)
    due = soon(3)
    async with Api(first) as api:
        reminder_id = await create(api, due)
    await first.stop()
    await redis.flushall()
    assert await wheel_scores(wheel) == {}

    second = await daemon_factory(**FAST)

    async def rebuilt() -> bool:
        return str(reminder_id) in await wheel_scores(wheel)

    await wait_for(rebuilt, timeout=2)
    assert datetime.now(UTC) < due
    fired = await wait_status(db, reminder_id, "fired")
    assert fired["late"] is False
    await wait_all_sent(db, 2)
    assert await count(db, "SELECT count(*) FROM notifications") == 2
    assert fired_counter(second) == 1


# ---------------------------------------------------------------------------------------------
# contacts, channels, time zones


@pytest.fixture
async def twilio() -> AsyncIterator[TwilioStandin]:
    async with TwilioStandin({SID: AUTH_TOKEN}) as standin:
        yield standin


def local_time(when: datetime, zone: str) -> str:
    """`HH:MM ABBR`, as the recipient reads it."""
    local = when.astimezone(ZoneInfo(zone))
    return f"{local:%H:%M} {local.tzname()}"


async def test_reminder_shows_the_interview_in_each_recipients_zone_on_every_channel(
    daemon_factory: DaemonFactory,
    db: asyncpg.Connection,
    smtp_sink: SmtpSink,
    twilio: TwilioStandin,
) -> None:
    daemon = await daemon_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(smtp_sink.port),
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        TWILIO_PHONE="+14155550100",
        TWILIO_API_BASE_URL=twilio.base_url,
        **FAST,
    )
    interview = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=15, minute=0, second=0, microsecond=0
    )
    new_york = local_time(interview, "America/New_York")  # 10:00 EST or 11:00 EDT
    kolkata = local_time(interview, "Asia/Kolkata")
    assert kolkata == "20:30 IST"
    contacts = {
        "candidate_contact": {
            "email": "cand@example.com",
            "phone": "+1 212 555 0123",
            "timezone": "America/New_York",
        },
        "employer_contact": {
            "email": "emp@example.com",
            "phone": "+91 98765 43210",
            "timezone": "Asia/Kolkata",
        },
    }
    async with Api(daemon) as api:
        everything = await create(api, soon(0.5), interview_time=interview, **contacts)
        in_app_only = await create(
            api, soon(0.5), interview_time=interview, channels=["in_app"], **contacts
        )
        for reminder_id in (everything, in_app_only):
            await wait_status(db, reminder_id, "fired")
        await wait_all_sent(db, 8)

        made = await db.fetch(
            "SELECT channel, recipient FROM notifications WHERE id = ANY($1::uuid[])",
            (await row(db, everything))["notification_ids"],
        )
        assert sorted((n["channel"], n["recipient"]) for n in made) == [
            ("email", "cand@example.com"),
            ("email", "emp@example.com"),
            ("in_app", "cand-1"),
            ("in_app", "emp-1"),
            ("sms", "+12125550123"),
            ("sms", "+919876543210"),
        ]
        made = await db.fetch(
            "SELECT channel, recipient FROM notifications WHERE id = ANY($1::uuid[])",
            (await row(db, in_app_only))["notification_ids"],
        )
        assert sorted((n["channel"], n["recipient"]) for n in made) == [
            ("in_app", "cand-1"),
            ("in_app", "emp-1"),
        ]

        for user, shown, zone in (
            ("cand-1", new_york, "America/New_York"),
            ("emp-1", kolkata, "Asia/Kolkata"),
        ):
            status, listed, _ = await api.get("/notifications/", user=user)
            assert status == 200
            messages = [n["message"] for n in listed if n["notification_type"] == "in_app"]
            assert len(messages) == 2
            for message in messages:
                assert shown in message and f"({zone})" in message, message

    emails = await asyncio.to_thread(smtp_sink.wait_for, 2)
    by_rcpt = {r.rcpt_tos[0]: r for r in emails}
    assert set(by_rcpt) == {"cand@example.com", "emp@example.com"}
    for address, shown in (("cand@example.com", new_york), ("emp@example.com", kolkata)):
        text = by_rcpt[address].message.get_body(preferencelist=("plain",))
        assert text is not None and shown in text.get_content()
    sms = {m.to: m.body for m in twilio.messages}
    assert set(sms) == {"+12125550123", "+919876543210"}
    assert new_york in sms["+12125550123"]
    assert kolkata in sms["+919876543210"]


async def test_invalid_contact_fields_are_a_422_naming_each_field_and_store_nothing(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule
) -> None:
    daemon = await daemon_factory(**FAST)
    body = {
        "application_id": "app-1",
        "candidate_id": "cand-1",
        "employer_id": "emp-1",
        "interview_time": rfc3339(soon(7200)),
        "reminder_time": rfc3339(soon(3600)),
        "candidate_contact": {"timezone": "Mars/Olympus_Mons", "phone": "not-a-phone"},
        "employer_contact": {"email": "not-an-address", "fax": "123"},
        "channels": ["in_app", "fax"],
    }
    async with Api(daemon) as api:
        status, problem, headers = await api.post(
            "/reminders/create/", body, user=SERVICE, role="service"
        )
    assert status == 422, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert {e["field"] for e in problem["errors"]} == {
        "candidate_contact.timezone",
        "candidate_contact.phone",
        "employer_contact.email",
        "employer_contact.fax",
        "channels",
    }
    assert await count(db, "SELECT count(*) FROM interview_reminders") == 0
    assert await wheel_scores(wheel) == {}


# ---------------------------------------------------------------------------------------------
# idempotency, opt-outs, metrics


async def test_same_idempotency_key_makes_one_reminder_and_one_wheel_entry(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, wheel: Schedule
) -> None:
    daemon = await daemon_factory(**FAST)
    due = soon(3600)
    interview = soon(7200)
    async with Api(daemon) as api:
        headers = {"Idempotency-Key": "reminder-create-1"}
        first = await create(api, due, interview_time=interview, headers=headers)
        again = await create(api, due, interview_time=interview, headers=headers)
    assert again == first
    assert await count(db, "SELECT count(*) FROM interview_reminders") == 1
    assert await wheel_scores(wheel) == {str(first): pytest.approx(due.timestamp() * 1000, abs=1)}


async def test_opted_out_candidate_still_gets_the_reminder_because_it_is_critical(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, smtp_sink: SmtpSink
) -> None:
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(smtp_sink.port), **FAST)
    async with Api(daemon) as api:
        status, body, _ = await api.request(
            "PUT",
            "/preferences/",
            json={"channels": {"in_app": False, "email": False}},
            user="cand-1",
        )
        assert status == 200, body
        reminder_id = await create(api, soon(0.5), candidate_contact={"email": "cand@example.com"})
        await wait_status(db, reminder_id, "fired")
        await wait_all_sent(db, 3)  # none `suppressed`
    rows = await db.fetch("SELECT channel, recipient, critical FROM notifications")
    assert sorted((r["channel"], r["recipient"]) for r in rows) == [
        ("email", "cand@example.com"),
        ("in_app", "cand-1"),
        ("in_app", "emp-1"),
    ]
    assert all(r["critical"] for r in rows)
    [email] = await asyncio.to_thread(smtp_sink.wait_for, 1)
    assert email.rcpt_tos == ["cand@example.com"]


async def test_fired_outcome_and_lateness_histogram_are_in_metrics(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        reminder_id = await create(api, soon(0.3))
        await wait_status(db, reminder_id, "fired")
        status, text, _ = await api.get("/metrics", auth=False)
    assert status == 200
    assert isinstance(text, str)

    def sample(name: str) -> float:
        found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
        assert found, f"{name} not in /metrics"
        return float(found.group(1))

    assert sample('notifyd_reminders_total{outcome="scheduled"}') == 1
    assert sample('notifyd_reminders_total{outcome="fired"}') == 1
    assert sample("notifyd_reminder_lateness_ms_count") == 1
    assert 0 <= sample("notifyd_reminder_lateness_ms_sum") < 1000
