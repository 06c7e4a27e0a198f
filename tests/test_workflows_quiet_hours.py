"""Quiet hours (issue 27): a step inside the recipient's quiet window waits for its end.

Promises checked: the window is read in the recipient's time zone (UTC when they have none),
wraps midnight, ends at `end` (a step due at `end` goes), and crosses a daylight saving
change at the local `end`; a step inside it is deferred to the window's end (`reason`
`quiet_hours` while it waits) and then sent once; a critical trigger ignores quiet hours.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg

from notifyd.store import workflows as store
from notifyd.workflows import quiet_until
from tests.conftest import DaemonFactory
from tests.helpers import Api, wait_for
from tests.test_workflows_fire import (
    FAST,
    ONE_IN_APP,
    SERVICE,
    STEPS,
    USER,
    setup_tenant,
    trigger,
    wait_done,
)

NIGHT = {"start": "21:00", "end": "08:00"}
BERLIN = ZoneInfo("Europe/Berlin")


def at(zone: ZoneInfo, *parts: int) -> datetime:
    return datetime(*parts, tzinfo=zone)  # type: ignore[misc]


KIRITIMATI = ZoneInfo("Pacific/Kiritimati")  # UTC+14: a window there never holds in UTC now


def quiet_for_seconds(zone: ZoneInfo, seconds: float) -> tuple[dict[str, str], datetime]:
    """A quiet window that began half an hour ago in `zone` and ends `seconds` from now;
    and its end."""
    now = datetime.now(UTC).astimezone(zone)
    end = now + timedelta(seconds=seconds)
    start = (now - timedelta(minutes=30)).strftime("%H:%M:%S")
    return {"start": start, "end": end.strftime("%H:%M:%S")}, end


async def quiet_tenant_in_kiritimati(api: Api, quiet: dict[str, str]) -> None:
    """The one-step in-app workflow with `quiet` hours, read in the tenant's default zone."""
    await setup_tenant(api, {**ONE_IN_APP, "quiet_hours": quiet})
    status, answer, _ = await api.request(
        "PUT",
        "/tenants/current/settings/",
        json={"default_timezone": "Pacific/Kiritimati"},
        user="ops-admin",
        role="admin",
    )
    assert status == 200 and answer["default_timezone"] == "Pacific/Kiritimati", answer


def test_the_window_is_read_in_the_recipients_zone_and_wraps_midnight() -> None:
    # 22:30 in Berlin (20:30 UTC, summer): quiet until 08:00 Berlin the next morning
    late = at(BERLIN, 2026, 7, 1, 22, 30)
    assert quiet_until(late, NIGHT, "Europe/Berlin") == at(BERLIN, 2026, 7, 2, 8, 0)
    # 05:00 Berlin: quiet until 08:00 the same morning
    early = at(BERLIN, 2026, 7, 2, 5, 0)
    assert quiet_until(early, NIGHT, "Europe/Berlin") == at(BERLIN, 2026, 7, 2, 8, 0)
    # midday, and exactly at the end: it goes now
    assert quiet_until(at(BERLIN, 2026, 7, 2, 12, 0), NIGHT, "Europe/Berlin") is None
    assert quiet_until(at(BERLIN, 2026, 7, 2, 8, 0), NIGHT, "Europe/Berlin") is None
    # the same instant for a recipient without a zone is 20:30 UTC: not quiet yet
    assert quiet_until(late, NIGHT, None) is None
    # a window within one day, to the second
    day = {"start": "12:00", "end": "13:30:15"}
    assert quiet_until(at(UTC, 2026, 7, 2, 12, 5), day, None) == at(UTC, 2026, 7, 2, 13, 30, 15)
    assert quiet_until(at(UTC, 2026, 7, 2, 11, 59), day, None) is None
    assert quiet_until(at(UTC, 2026, 7, 2, 12, 0), None, None) is None


def test_the_end_is_local_across_a_daylight_saving_change() -> None:
    # the night of 28 to 29 March 2026: Berlin moves from +01:00 to +02:00 at 02:00
    night = at(BERLIN, 2026, 3, 28, 23, 0)
    until = quiet_until(night, NIGHT, "Europe/Berlin")
    assert until is not None
    assert until.astimezone(BERLIN).hour == 8
    assert until.astimezone(UTC) == datetime(2026, 3, 29, 6, 0, tzinfo=UTC)


async def test_a_step_inside_quiet_hours_waits_for_their_end_then_goes_once_unless_critical(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    zone = ZoneInfo("Asia/Tokyo")
    now = datetime.now(UTC).astimezone(zone)
    end = now + timedelta(seconds=4)
    quiet = {
        "start": (now - timedelta(hours=1)).strftime("%H:%M:%S"),
        "end": end.strftime("%H:%M:%S"),
    }
    definition = {**ONE_IN_APP, "quiet_hours": quiet}
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await setup_tenant(api, definition)
        status, answer, _ = await api.request(
            "PATCH", "/recipients/me/", json={"timezone": "Asia/Tokyo"}, user=USER
        )
        assert status == 200, answer
        (quiet_run,) = await trigger(api)
        (critical_run,) = await trigger(api, critical=True)

        async def deferred() -> bool:
            rows = await db.fetch(STEPS, quiet_run)
            return rows[0]["reason"] == "quiet_hours"

        await wait_for(deferred, timeout=5)
        waiting = (await db.fetch(STEPS, quiet_run))[0]
        assert waiting["status"] == "pending"
        expected = end.replace(microsecond=0)
        assert waiting["due_at"] == expected
        _, run, _ = await api.get(f"/workflows/runs/{quiet_run}/", user=SERVICE, role="service")
        assert run["steps"][0]["reason"] == "quiet_hours"
    critical = await wait_done(db, critical_run)
    assert critical[0]["status"] == "sent"
    assert critical[0]["done_at"] < expected
    sent = await wait_done(db, quiet_run, timeout=15)
    assert sent[0]["status"] == "sent"
    assert sent[0]["done_at"] >= expected
    made = "SELECT count(*) FROM notifications WHERE id = ANY($1)"
    assert await db.fetchval(made, sent[0]["notification_ids"]) == 1


async def test_a_recipient_without_a_zone_has_quiet_hours_in_the_tenants_default_zone(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: quiet hours are read in the recipient's zone, else the tenant's default
    (`default_timezone` of its settings), else UTC: a window that holds now in the tenant's
    zone (and not in UTC) defers the step of a recipient who has none."""
    quiet, end = quiet_for_seconds(KIRITIMATI, 3)
    assert quiet_until(datetime.now(UTC), quiet, None) is None  # not quiet in UTC
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await quiet_tenant_in_kiritimati(api, quiet)
        (run_id,) = await trigger(api)

        async def deferred() -> bool:
            return (await db.fetch(STEPS, run_id))[0]["reason"] == "quiet_hours"

        await wait_for(deferred, timeout=5)
    sent = await wait_done(db, run_id, timeout=15)
    assert sent[0]["status"] == "sent"
    assert sent[0]["done_at"] >= end.replace(microsecond=0)


async def test_a_waves_steps_inside_quiet_hours_are_deferred_together_each_once(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: the steps of one wave that fall inside quiet hours move to the window's end
    together (one transaction, one audit row each), and each is then sent once; a step that
    is no longer pending when its wave defers it is left as it is."""
    quiet, end = quiet_for_seconds(KIRITIMATI, 3)
    recipients = [f"cand-{i}" for i in range(12)]
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await quiet_tenant_in_kiritimati(api, quiet)
        runs = await trigger(api, recipients=recipients)

        async def all_deferred() -> bool:
            waiting = """SELECT count(*) FROM workflow_steps
                         WHERE run_id = ANY($1) AND status = 'pending' AND reason = 'quiet_hours'"""
            return await db.fetchval(waiting, runs) == len(runs)

        await wait_for(all_deferred, timeout=5)
    expected = end.replace(microsecond=0)
    for run_id in runs:
        sent = await wait_done(db, run_id, timeout=15)
        assert sent[0]["status"] == "sent" and sent[0]["done_at"] >= expected
        assert len(sent[0]["notification_ids"]) == 1
    deferrals = [
        json.loads(details)
        for details in await db.fetchval(
            "SELECT array_agg(details) FROM audit_log WHERE action = 'workflow.step.deferred'"
        )
    ]
    assert sorted(d["run_id"] for d in deferrals) == sorted(str(r) for r in runs)
    assert {d["until"] for d in deferrals} == {expected.isoformat()}


async def test_a_cancelled_step_inside_quiet_hours_is_not_deferred(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: a deferral moves pending steps only. A step cancelled (or fired by a peer)
    between its wave's read and the deferral keeps its status and time, and no deferral is
    audited for it."""
    later = datetime.now(UTC) + timedelta(hours=1)
    daemon = await daemon_factory(**FAST)
    async with Api(daemon) as api:
        await setup_tenant(api, ONE_IN_APP)
        (run_id,) = await trigger(api, send_at=later.isoformat(), cancel_key="interview-7")
        status, answer, _ = await api.post(
            "/workflows/interview/cancel/",
            {"cancel_key": "interview-7"},
            user=SERVICE,
            role="service",
        )
        assert status == 200 and answer["cancelled"] == 1, answer
    before = (await db.fetch(STEPS, run_id))[0]
    assert before["status"] == "cancelled"
    tenant_id = await db.fetchval("SELECT tenant_id FROM workflow_runs WHERE id = $1", run_id)
    key = (tenant_id, run_id, 0)
    async with db.transaction():
        await store.lock_steps(db, [key])
        moved = await store.defer_steps(db, [(key, later + timedelta(hours=8))])
    assert moved == []
    after = (await db.fetch(STEPS, run_id))[0]
    assert (after["status"], after["due_at"], after["reason"]) == (
        "cancelled",
        before["due_at"],
        before["reason"],
    )
    deferred = "SELECT count(*) FROM audit_log WHERE action = 'workflow.step.deferred'"
    assert await db.fetchval(deferred) == 0
