"""The `reminders` benchmark runs end to end against a real daemon and reads true outcomes."""

from __future__ import annotations

import json

import asyncpg
import pytest

from bench.common import BenchError, require_loopback_url
from bench.reminders import ReminderOptions, main
from tests.conftest import DaemonFactory
from tests.helpers import TEST_JWT_SECRET

KEYS = {
    "workload",
    "count",
    "spread_s",
    "created_per_s",
    "fired",
    "missing",
    "duplicates",
    "lateness_ms",
    "machine",
}


async def test_reminders_workload_reports_every_reminder_fired_once(
    daemon_factory: DaemonFactory, database_url: str, db: asyncpg.Connection
) -> None:
    """Promise: `python -m bench reminders` creates Q reminders over REST, waits for them and
    reports fired == Q, 0 missing, 0 duplicates, with lateness read from the daemon's rows."""
    daemon = await daemon_factory(
        NOTIFYD_SWEEP_INTERVAL="0.2", NOTIFYD_CLAIM_IDLE="2", NOTIFYD_SEND_TIMEOUT="1"
    )
    result = await main(
        ReminderOptions(
            url=f"http://127.0.0.1:{daemon.port}",
            database_url=database_url,
            jwt_secret=TEST_JWT_SECRET,
            count=200,
            spread=2.0,
            margin=10.0,
            settle=0.5,
            quiet=True,
        )
    )
    decoded = json.loads(json.dumps(result))
    assert decoded.keys() >= KEYS
    assert decoded["workload"] == "reminders"
    assert decoded["path"] == "rest"
    assert decoded["created"] == 200
    assert decoded["fired"] == 200
    assert decoded["missing"] == 0
    assert decoded["duplicates"] == 0
    assert decoded["created_after_due"] == 0
    assert set(decoded["lateness_ms"]) == {"p50", "p99", "max"}
    assert 0 <= decoded["lateness_ms"]["p50"] <= decoded["lateness_ms"]["max"]
    assert decoded["notifications"] == 400
    assert decoded["machine"]["postgresql"]
    # the figures are the daemon's own: its rows agree
    tenant = decoded["run"]["tenant"]
    fired = await db.fetchval(
        "SELECT count(*) FROM interview_reminders WHERE tenant_id = $1 AND status = 'fired' "
        "AND starts_with(application_id, $2)",
        tenant,
        decoded["run"]["application_prefix"],
    )
    assert fired == 200


def test_the_harness_refuses_hosts_that_are_not_loopback() -> None:
    """Promise: the harness only ever talks to loopback."""
    require_loopback_url("http://127.0.0.1:8000", "--url")
    require_loopback_url("postgresql://postgres@localhost:5432/db", "--database-url")
    with pytest.raises(BenchError):
        require_loopback_url("http://192.0.2.10:8000", "--url")
