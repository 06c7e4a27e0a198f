"""The benchmark harness runs end to end against a real daemon and reads true outcomes.

Every workload runs here with tiny counts; each test checks the JSON keys and that the
figures agree with what really happened (rows in PostgreSQL, mails at the sink, the
daemon's own gauges), never how fast anything was.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from bench import (
    connections,
    email_e2e,
    limits,
    loadgen,
    noisy_neighbour,
    redis_footprint,
    rest_ingest,
    retention,
    suite,
    tenant_config,
    webhooks,
    workflows,
    ws_fanout,
)
from bench.__main__ import WORKLOADS, build_parser
from bench.common import BenchError, TokenMinter, free_port, require_loopback_url
from bench.reminders import ReminderOptions, main
from bench.spawn import BareServer
from tests.conftest import DaemonFactory
from tests.helpers import TEST_JWT_SECRET, wait_for

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
HAS_WRK = shutil.which("wrk") is not None
# the chat endpoint's per-connection limit, far above what the tests send
NO_WS_LIMIT = {"NOTIFYD_WS_MESSAGE_RATE": "100000", "NOTIFYD_WS_MESSAGE_BURST": "100000"}


def as_json(result: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints, read back: the figures must survive JSON."""
    decoded: dict[str, Any] = json.loads(json.dumps(result))
    assert decoded["machine"]["cpu_count"] >= 1
    return decoded


async def notifications_of(db: asyncpg.Connection, tenant: str) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT status, count(*) AS n FROM notifications WHERE tenant_id = $1 GROUP BY 1", tenant
    )
    return {r["status"]: r["n"] for r in rows}


async def has_statuses(db: asyncpg.Connection, tenant: str, wanted: dict[str, int]) -> bool:
    return await notifications_of(db, tenant) == wanted


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


async def test_workflows_workload_reports_every_step_fired_or_skipped_once(
    daemon_factory: DaemonFactory, database_url: str, db: asyncpg.Connection
) -> None:
    """Promise: `python -m bench workflows` triggers N runs of its three-step workflow, reads
    some of them during the delays, and reports every step fired or skipped once (0
    missing, 0 duplicates, no step that ignored a read), read from the daemon's rows."""
    daemon = await daemon_factory(
        NOTIFYD_SWEEP_INTERVAL="0.2", NOTIFYD_CLAIM_IDLE="2", NOTIFYD_SEND_TIMEOUT="1"
    )
    result = as_json(
        await workflows.main(
            workflows.WorkflowOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                database_url=database_url,
                jwt_secret=TEST_JWT_SECRET,
                count=60,
                spread=1.0,
                delays=(1.0, 2.0, 3.0),
                read_share=0.5,
                margin=15.0,
                settle=0.5,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "workflows"
    assert result["triggered"] == 60 and result["trigger_errors"] == {}
    assert result["steps"] == 180
    assert result["fired"] == 180
    assert result["missing"] == 0
    assert result["duplicates"] == 0
    assert result["read_violations"] == 0
    assert result["reads"].get("read", 0) > 0
    assert set(result["lateness_ms"]) == {"p50", "p99", "max"}
    assert set(result["lateness_ms_by_step"]) == {"0", "1", "2"}
    # the figures are the daemon's own: its rows agree
    tenant = result["run"]["tenant"]
    rows = await db.fetch(
        "SELECT status, reason, count(*) AS n FROM workflow_steps WHERE tenant_id = $1 "
        "GROUP BY 1, 2",
        tenant,
    )
    counted = {r["status"] + (f"/{r['reason']}" if r["reason"] else ""): r["n"] for r in rows}
    assert counted == result["statuses"]
    sent = sum(n for key, n in counted.items() if key == "sent")
    assert result["notifications"] == sent
    made = "SELECT count(*) FROM notifications WHERE tenant_id = $1"
    assert await db.fetchval(made, tenant) == sent


def test_the_harness_refuses_hosts_that_are_not_loopback() -> None:
    """Promise: the harness only ever talks to loopback."""
    require_loopback_url("http://127.0.0.1:8000", "--url")
    require_loopback_url("postgresql://postgres@localhost:5432/db", "--database-url")
    # Unix sockets are this machine's too (`scripts/localservers.py up --unix`)
    require_loopback_url("postgresql://postgres@/db?host=/tmp/s&port=5432", "--database-url")
    require_loopback_url("unix:///tmp/s/redis.sock?db=0", "--redis-url")
    with pytest.raises(BenchError):
        require_loopback_url("http://192.0.2.10:8000", "--url")
    with pytest.raises(BenchError):
        require_loopback_url("redis://192.0.2.10:6379/0", "--redis-url")
    with pytest.raises(BenchError):
        require_loopback_url("unix://", "--redis-url")


def test_every_workload_parses_its_command_line_into_its_options() -> None:
    """Promise: `python -m bench <workload> --help`'s options reach the workload (a renamed
    option would otherwise only fail on the operator's machine)."""
    parser = build_parser()
    for name, (module, _) in WORKLOADS.items():
        args = parser.parse_args([name, "--jwt-secret", TEST_JWT_SECRET])
        assert args.workload == name
        module.options_from(args)
    args = parser.parse_args(["ws_fanout", "--rooms", "3", "--members", "4", "--rate", "50"])
    fanout = ws_fanout.options_from(args)
    assert (fanout.rooms, fanout.members, fanout.rate) == (3, 4, 50.0)
    args = parser.parse_args(["limits", "--ws-rooms", "3", "--http-duration", "2"])
    ceilings = limits.options_from(args)
    assert (ceilings.ws_rooms, ceilings.http_duration) == (3, 2.0)
    with pytest.raises(BenchError):
        suite.options_from(parser.parse_args(["all", "--skip", "nonsense"]))


async def test_limits_measures_every_ceiling_and_checks_its_own_counts(
    database_url: str, redis_url: str, db: asyncpg.Connection
) -> None:
    """Promise: `limits` loads its bare servers, PostgreSQL + Redis and the SMTP sink, and
    each figure comes with the counts that prove the work was done; it leaves nothing."""
    result = as_json(
        await limits.main(
            limits.LimitsOptions(
                database_url=database_url,
                redis_url=redis_url,
                http_connections=4,
                http_duration=1.0,
                ws_rooms=2,
                ws_members=3,
                ws_messages=2,
                pg_rows=256,
                pg_concurrency=2,
                smtp_count=20,
                smtp_connections=2,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "limits"
    for key in (
        "http_req_per_s",
        "ws_delivered_per_s",
        "pg_xadd_rows_per_s",
        "pg_xadd_rows_per_s_single",
        "smtp_per_s",
    ):
        assert result[key] > 0, key
    http = result["http"]
    assert http["generator"] == ("wrk" if HAS_WRK else "python")
    assert http["requests"] > 0
    assert http["errors"] == 0
    ws = result["ws"]
    assert ws["expected"] == ws["delivered"] == 2 * 3 * 2 * 3  # rooms x senders x S x members
    assert (ws["lost"], ws["duplicates"]) == (0, 0)
    pg = result["pg_xadd"]
    assert pg["rows_batched"] == 256  # 4 batches of 64
    assert pg["rows_single"] == 256
    assert pg["rows_in_table"] == pg["entries_in_stream"] == 512
    smtp = result["smtp"]
    assert (smtp["arrived"], smtp["missing"], smtp["duplicates"]) == (20, 0, 0)
    assert result["machine"]["postgresql"]
    # the scratch table and stream are gone
    assert not await db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename ~ '^bench_'")
    client = Redis.from_url(redis_url)
    try:
        assert await client.keys("bench:*") == []
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "generator",
    [
        pytest.param("wrk", marks=pytest.mark.skipif(not HAS_WRK, reason="wrk not installed")),
        "python",
    ],
)
async def test_rest_ingest_counts_what_the_daemon_stored(
    daemon_factory: DaemonFactory, db: asyncpg.Connection, generator: str
) -> None:
    """Promise: `rest_ingest` reports the requests the daemon answered 202, and the daemon
    stored that many (plus the probe; wrk may stop with a request per connection in flight,
    which the daemon may still store)."""
    daemon = await daemon_factory()
    result = as_json(
        await rest_ingest.main(
            rest_ingest.IngestOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                connections=4,
                duration=1.0,
                generator=generator,
                quiet=True,
                pid=os.getpid(),  # the daemon runs in this process
                cpu_settle=0.2,
            )
        )
    )
    assert result["workload"] == "rest_ingest"
    # the CPU this process spent per answered request: something, and not absurd
    assert 0 < result["daemon_cpu_us_per_req"] < 1_000_000
    # and what the test PostgreSQL and Redis spent on them (clock ticks of 10 ms: a second's
    # run may leave Redis alone under one, but not both servers together)
    servers = (result["postgres_cpu_us_per_req"], result["redis_cpu_us_per_req"])
    assert min(servers) >= 0 and sum(servers) > 0
    assert result["generator"] == generator
    assert result.keys() >= {"req_per_s", "p50_ms", "p99_ms", "errors", "machine"}
    assert result["errors"] == 0
    assert result["requests"] > 0
    assert result["req_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    stored = await notifications_of(db, result["run"]["tenant"])
    in_flight = 4 if generator == "wrk" else 0
    assert result["requests"] + 1 <= sum(stored.values()) <= result["requests"] + 1 + in_flight
    # and it followed the deliveries until every accepted one was sent (the probe's excluded)
    assert result["requests"] <= result["delivered"] <= result["requests"] + in_flight
    assert stored.get("sent", 0) >= result["delivered"] + 1
    assert 0 <= result["drain_s"] < 60
    assert 0 < result["delivered_per_s"] <= result["req_per_s"] * 1.01


@pytest.mark.skipif(not HAS_WRK, reason="wrk not installed")
async def test_the_wrk_script_counts_every_refused_request_as_an_error(
    daemon_factory: DaemonFactory,
) -> None:
    """Promise: answers that are not 2xx are errors, summed over every wrk thread, and never
    counted in req_per_s (here: a token the daemon does not accept)."""
    daemon = await daemon_factory()
    forged = TokenMinter("not-the-daemon-secret-0123456789").mint(
        tenant_id="bench-x", user_id="bench-service", role="service", ttl=600
    )
    result = await loadgen.run(
        loadgen.Load(
            url=f"http://127.0.0.1:{daemon.port}",
            token=forged,
            recipient_prefix="bench-x-u",
            connections=4,
            threads=2,
            duration=1.0,
            generator="wrk",
        )
    )
    assert result["threads"] == 2
    assert result["requests"] > 0
    assert result["non2xx"] == result["errors"] == result["requests"]
    assert result["last_non2xx"] == 401
    assert result["req_per_s"] == 0


async def test_email_e2e_counts_each_mail_the_sink_received(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `email_e2e` runs its own SMTP sink; the daemon, pointed at it, delivers K
    mails and the harness reports K arrived, 0 missing, 0 duplicates; the daemon's rows say
    sent for all of them (and the probe)."""
    port = free_port()
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(port))
    result = as_json(
        await email_e2e.main(
            email_e2e.EmailOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                smtp_port=port,
                count=30,
                margin=20.0,
                settle=0.3,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "email_e2e"
    assert result.keys() >= {"per_s", "missing", "duplicates", "p99_ms", "machine"}
    assert (result["accepted"], result["arrived"], result["sink_received"]) == (30, 30, 30)
    assert (result["missing"], result["duplicates"]) == (0, 0)
    assert result["per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    tenant = result["run"]["tenant"]
    # the daemon records "sent" once the sink's 250 reaches it, just after the sink counted it
    await wait_for(lambda: has_statuses(db, tenant, {"sent": 31}))


async def test_webhooks_counts_each_verified_webhook_the_receiver_got(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `webhooks` runs its own verifying receiver; the daemon, allowed to call it,
    delivers a webhook per notification and the harness reports K arrived, none missing,
    duplicated or unverified; it deletes its endpoint at the end."""
    daemon = await daemon_factory(
        NOTIFYD_TENANT_SECRET_KEY="bench-key",
        NOTIFYD_WEBHOOK_ALLOW_HTTP="true",
        NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.1/32",
    )
    result = as_json(
        await webhooks.main(
            webhooks.WebhookOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                count=30,
                margin=20.0,
                settle=0.3,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "webhooks"
    assert (result["accepted"], result["arrived"]) == (30, 30)
    assert (result["missing"], result["duplicates"], result["unverified"]) == (0, 0, 0)
    assert result["per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert await db.fetchval("SELECT count(*) FROM webhook_endpoints") == 0


async def test_tenant_config_serves_templates_and_counts_what_the_source_was_asked(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `tenant_config` runs its own auth-service stand-in; the daemon pointed at it
    renders the sourced tenants' sends from the source's template and the stored tenants'
    from notifyd's copy; the source is asked about once per tenant per TTL, not per send,
    and a slow source leaves sends bounded by the 1 s a read of an expired copy waits."""
    port = free_port()
    daemon = await daemon_factory(
        NOTIFYD_TENANT_CONFIG_URL=f"http://127.0.0.1:{port}/tenants/{{tenant_id}}/notification-config",
        NOTIFYD_TENANT_CONFIG_TOKEN="bench-source-token",
        NOTIFYD_TENANT_CONFIG_TTL="1",
    )
    result = as_json(
        await tenant_config.main(
            tenant_config.TenantConfigOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                source_port=port,
                ttl=1.0,
                tenants=3,
                connections=4,
                duration=1.5,
                slow_delay=2.0,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "tenant_config"
    assert result["sourced"]["sent"] > 0 and result["stored"]["sent"] > 0
    assert result["sourced"]["errors"] == result["stored"]["errors"] == 0
    assert result["unauthorized"] == 0
    assert 0 < result["source_requests_per_tenant_per_ttl"] <= 2
    assert result["slow"]["sent"] > 0 and result["slow"]["errors"] == {}
    assert result["slow"]["max_ms"] < 2000  # never the slow source's 2 s
    rendered = await db.fetch(
        "SELECT DISTINCT tenant_id LIKE '%-s%' AS sourced, body FROM notifications"
    )
    assert {row["body"] for row in rendered} == {
        "Hello Ann, your interview for Engineer is confirmed."
    }
    assert {row["sourced"] for row in rendered} == {True, False}


async def test_email_e2e_reports_mail_that_never_arrived_as_missing(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `missing` is true: when the sink refuses every 5th mail (550, so the daemon
    fails it), those are the missing ones."""
    port = free_port()
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(port))
    result = await email_e2e.main(
        email_e2e.EmailOptions(
            url=f"http://127.0.0.1:{daemon.port}",
            jwt_secret=TEST_JWT_SECRET,
            smtp_port=port,
            count=19,
            margin=3.0,
            settle=0.2,
            sink_refuses_every=5,
            quiet=True,
        )
    )
    # 20 mails reach the sink (the probe first); the 5th, 10th, 15th and 20th are refused
    assert (result["accepted"], result["arrived"], result["missing"]) == (19, 15, 4)
    assert result["duplicates"] == 0
    tenant = result["run"]["tenant"]
    await wait_for(lambda: has_statuses(db, tenant, {"sent": 16, "failed": 4}))


@pytest.mark.parametrize("rate", [0.0, 400.0])
async def test_ws_fanout_counts_deliveries_and_losses_exactly(rate: float) -> None:
    """Promise: against the bare fan-out server of `limits` (same frames as the chat
    endpoint), `ws_fanout` counts every delivery once, burst or paced, and when the server
    skips every 5th delivery, `lost` is exactly what it skipped."""
    claim = TokenMinter(TEST_JWT_SECRET).user_claim
    options = ws_fanout.FanoutOptions(
        jwt_secret=TEST_JWT_SECRET, rooms=2, members=3, messages=4, rate=rate, quiet=True
    )
    async with BareServer("ws", "--user-claim", claim) as server:
        options.url = f"http://127.0.0.1:{server.port}"
        clean = as_json(await ws_fanout.main(options))
    async with BareServer("ws", "--user-claim", claim, "--drop-every", "5") as server:
        options.url = f"http://127.0.0.1:{server.port}"
        options.drain = 0.5
        lossy = await ws_fanout.main(options)
    assert clean["workload"] == "ws_fanout"
    assert clean["mode"] == ("paced" if rate else "burst")
    assert clean.keys() >= {"delivered_per_s", "lost", "p50_ms", "p99_ms", "setup_per_s"}
    assert clean["messages_sent"] == 2 * 3 * 4
    assert clean["expected"] == clean["delivered"] == 2 * 3 * 4 * 3
    assert (clean["lost"], clean["duplicates"], clean["errors"]) == (0, 0, 0)
    assert clean["delivered_per_s"] > 0 and clean["setup_per_s"] > 0
    assert 0 <= clean["p50_ms"] <= clean["p99_ms"] <= clean["max_ms"]
    assert lossy["lost"] == 72 // 5
    assert lossy["delivered"] == 72 - 72 // 5
    assert lossy["duplicates"] == 0


async def test_ws_fanout_against_the_chat_endpoint(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `ws_fanout` drives notifyd's chat rooms: every member hears every message
    once, and the daemon stored each message once."""
    daemon = await daemon_factory(**NO_WS_LIMIT)
    result = as_json(
        await ws_fanout.main(
            ws_fanout.FanoutOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                rooms=2,
                members=3,
                messages=3,
                drain=10.0,
                quiet=True,
            )
        )
    )
    assert result["expected"] == result["delivered"] == 2 * 3 * 3 * 3
    assert (result["lost"], result["duplicates"], result["errors"]) == (0, 0, 0)
    assert result["closed_early"] == 0
    stored = await db.fetchval(
        "SELECT count(*) FROM messages WHERE tenant_id = $1", result["run"]["tenant"]
    )
    assert stored == 2 * 3 * 3


async def test_ws_fanout_spreads_each_room_over_several_processes(
    daemon_factory: DaemonFactory,
) -> None:
    """Promise: with `--also-url` every room has members on each daemon, every message
    crosses to the other through Redis, and each member still hears each message once."""
    first = await daemon_factory(**NO_WS_LIMIT)
    second = await daemon_factory(**NO_WS_LIMIT)
    result = as_json(
        await ws_fanout.main(
            ws_fanout.FanoutOptions(
                url=f"http://127.0.0.1:{first.port}",
                also_urls=(f"http://127.0.0.1:{second.port}",),
                jwt_secret=TEST_JWT_SECRET,
                rooms=2,
                members=4,
                messages=2,
                drain=10.0,
                quiet=True,
            )
        )
    )
    assert result["expected"] == result["delivered"] == 2 * 4 * 2 * 4
    assert (result["lost"], result["duplicates"], result["errors"]) == (0, 0, 0)
    for daemon in (first, second):  # each daemon holds 2 members of each room: 16 messages to each
        out = daemon.metrics.registry.get_sample_value("notifyd_ws_messages_out_total")
        assert out is not None and out >= 2 * 4 * 2 * 2


async def test_ws_fanout_shows_the_daemons_rate_limit_as_errors_and_losses(
    daemon_factory: DaemonFactory,
) -> None:
    """Promise: a daemon started with its default-sized limit refuses frames past the burst;
    the harness reports each refusal as an error and its deliveries as lost (which is why
    the docs say to start the daemon with a high limit)."""
    daemon = await daemon_factory(NOTIFYD_WS_MESSAGE_RATE="0.1", NOTIFYD_WS_MESSAGE_BURST="2")
    result = await ws_fanout.main(
        ws_fanout.FanoutOptions(
            url=f"http://127.0.0.1:{daemon.port}",
            jwt_secret=TEST_JWT_SECRET,
            rooms=1,
            members=2,
            messages=5,
            drain=1.0,
            quiet=True,
        )
    )
    senders = 2
    assert result["errors"] == senders * 3  # 5 sent, 2 allowed, 3 refused each
    assert result["lost"] == senders * 3 * 2
    assert result["delivered"] == senders * 2 * 2


async def test_connections_holds_n_sockets_and_reads_the_daemons_memory(
    daemon_factory: DaemonFactory,
) -> None:
    """Promise: `connections` finds the daemon by its listening port, holds N sockets (the
    daemon's own gauge agrees) with heartbeats, and reports its RSS per connection."""
    daemon = await daemon_factory()
    assert connections.pid_listening_on(daemon.port) == os.getpid()  # in-process daemon
    result = as_json(
        await connections.main(
            connections.ConnectionsOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                count=20,
                hold=1.5,
                # one ping per socket in the hold; aiohttp closes a socket whose pong is
                # later than half the interval, and this daemon shares the test's loop
                heartbeat=1.0,
                settle=0.0,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "connections"
    assert result["pid"] == os.getpid()
    assert (result["held"], result["server_connections"], result["closed_early"]) == (20, 20, 0)
    assert result["rss_before_kib"] > 0 and result["rss_after_kib"] > 0
    assert result["rss_kib_per_conn"] is not None
    assert result["harness_nofile"] >= 20 or result["harness_nofile"] == -1


async def test_all_runs_every_workload_and_prints_each_figure_beside_its_ceiling(
    daemon_factory: DaemonFactory, database_url: str, redis_url: str
) -> None:
    """Promise: `all` prints one line per workload run (ws_fanout burst and paced), then one
    line per figure with its ceiling and the ratio of the two."""
    port = free_port()
    daemon = await daemon_factory(EMAIL_HOST="127.0.0.1", EMAIL_PORT=str(port), **NO_WS_LIMIT)
    printed: list[dict[str, Any]] = []
    lines = await suite.main(
        suite.SuiteOptions(
            url=f"http://127.0.0.1:{daemon.port}",
            database_url=database_url,
            redis_url=redis_url,
            jwt_secret=TEST_JWT_SECRET,
            smtp_port=port,
            duration=1.0,
            http_connections=2,
            emails=5,
            rooms=1,
            members=2,
            messages=2,
            connections=5,
            hold=0.2,
            pg_rows=64,
            workflows=2,
            workflows_lead=0.5,
            workflows_spread=0.5,
            skip=("reminders",),
            backlog_bound=20.0,
            quiet=True,
        ),
        printed.append,
    )
    assert printed == lines
    runs = [line for line in lines if line["workload"] != "all"]
    assert [r["workload"] for r in runs] == [
        "limits",
        "connections",
        "rest_ingest",
        "email_e2e",
        "ws_fanout",
        "ws_fanout",
        "workflows",
    ]
    assert not [r for r in runs if "error" in r]
    assert [r["mode"] for r in runs if r["workload"] == "ws_fanout"] == ["burst", "paced"]
    ratios = [line for line in lines if line["workload"] == "all"]
    assert len(ratios) == len(suite.RATIOS)
    first = {r["workload"]: r for r in reversed(runs)}  # of ws_fanout: the burst
    for line, (workload, figure, ceiling) in zip(ratios, suite.RATIOS, strict=True):
        assert (line["figure"], line["ceiling"]) == (f"{workload}.{figure}", f"limits.{ceiling}")
        assert line["value"] == first[workload][figure] > 0
        assert line["ceiling_value"] == first["limits"][ceiling] > 0
        assert line["ratio"] == round(line["value"] / line["ceiling_value"], 3)


def test_server_cpu_counts_each_process_from_its_own_start() -> None:
    """Per process, not per name: one that ended during the run is left out (never a negative
    figure), one that started counts from zero, a reused pid is another process."""
    before = {(10, 1): ("postgres", 5.0), (11, 1): ("postgres", 9.0), (20, 1): ("redis", 1.0)}
    after = {
        (10, 1): ("postgres", 5.5),  # a backend that worked 0.5 s
        (12, 7): ("postgres", 0.25),  # started during the run
        (11, 8): ("postgres", 0.125),  # pid 11 reused by a new process
        (20, 1): ("redis", 1.0),  # idle
    }  # (11, 1) ended: its 9 s are not taken away
    assert rest_ingest.servers_cpu_seconds(before, after) == {"postgres": 0.875, "redis": 0.0}
    assert set(rest_ingest.servers_cpu_seconds({}, {}).values()) == {0.0}


async def test_rest_ingest_without_a_readable_metrics_page_keeps_its_other_figures() -> None:
    """A daemon whose /metrics cannot be read (here: nothing listens) does not sink the run's
    figures: the delivery figures are simply unknown."""
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{free_port()}"
        assert await rest_ingest._sent_so_far(session, url) is None
        assert await rest_ingest._follow_delivery(session, url, None, 10, 5.0) == (None, 0.0)
        delivered, waited = await rest_ingest._follow_delivery(session, url, 0.0, 10, 0.3)
        assert delivered is None and 0.3 <= waited < 2.5


async def test_retention_compares_ingest_alone_and_beside_a_purge(
    daemon_factory: DaemonFactory, database_url: str, db: asyncpg.Connection
) -> None:
    """Promise: `python -m bench retention` generates expired rows, runs `rest_ingest` alone
    and beside their purge, and reports both p99s and their ratio; the purge really deleted
    every generated row (quick mode: a few thousand rows, one pair of one-second runs)."""
    daemon = await daemon_factory(NOTIFYD_RETAIN_NOTIFICATIONS="0")
    result = as_json(
        await retention.main(
            retention.RetentionOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                database_url=database_url,
                jwt_secret=TEST_JWT_SECRET,
                rows=3000,
                pairs=1,
                duration=1.0,
                connections=4,
                generator="python",
                batch=200,
                pause=0.0,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "retention"
    [pair] = result["pairs"]
    assert pair["order"] == "alone first"
    assert pair["alone_p99_ms"] > 0 and pair["with_purge_p99_ms"] > 0
    assert pair["ratio"] == result["ratio_max"] == result["ratio_median"]
    assert pair["purged"] == 3000
    assert pair["errors"] == 0
    left = await db.fetchval(
        "SELECT count(*) FROM notifications WHERE created_by = 'bench-retention'"
    )
    assert left == 0


async def test_redis_footprint_measures_the_streams_and_sees_them_expire(
    daemon_factory: DaemonFactory, redis_url: str
) -> None:
    """Promise: `python -m bench redis_footprint` sends to made-up ids, reports one history
    stream per id with its size and expiry, and, waited for, that they are gone again."""
    daemon = await daemon_factory(NOTIFYD_WS_HISTORY_TTL="2")
    result = as_json(
        await redis_footprint.main(
            redis_footprint.FootprintOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                redis_url=redis_url,
                jwt_secret=TEST_JWT_SECRET,
                prefix=daemon.settings.redis_prefix,
                ids=50,
                size=512,
                concurrency=4,
                expiry_wait=30.0,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "redis_footprint"
    assert (result["accepted"], result["streams"]) == (50, 50)
    assert result["per_stream_bytes"] > 512
    assert 0 < result["ttl_s"]["min"] <= result["ttl_s"]["max"] <= 2
    assert result["after_expiry"]["streams_left"] == 0


async def test_noisy_neighbour_measures_b_beside_a_hung_relay_and_loses_nothing(
    daemon_factory: DaemonFactory, db: asyncpg.Connection
) -> None:
    """Promise: `noisy_neighbour` gives tenant A a relay that never answers and measures
    tenant B alone and beside A's backlog; with fair delivery B's mail all arrives in both
    phases, A's arrives once its relay recovers, and the figures (counts, parked entries,
    duplicates) are what the sink and the daemon's rows say."""
    port = free_port()
    daemon = await daemon_factory(
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=str(port),
        NOTIFYD_EGRESS_ALLOWED_NETWORKS="127.0.0.0/8",
        NOTIFYD_EGRESS_ALLOWED_PORTS="any",
        NOTIFYD_SMTP_CONNECT_TIMEOUT="0.5",
        NOTIFYD_BREAKER_FAILURES="3",
        NOTIFYD_BREAKER_COOLDOWN="1",
        NOTIFYD_RETRY_BASE="0.05",
        NOTIFYD_RETRY_CAP="0.5",
        NOTIFYD_SEND_MAX_ATTEMPTS="50",
    )
    result = as_json(
        await noisy_neighbour.main(
            noisy_neighbour.NoisyOptions(
                url=f"http://127.0.0.1:{daemon.port}",
                jwt_secret=TEST_JWT_SECRET,
                smtp_port=port,
                a_count=40,
                b_count=10,
                b_rate=50.0,
                margin=30.0,
                hang=2.5,
                settle=0.3,
                quiet=True,
            )
        )
    )
    assert result["workload"] == "noisy_neighbour"
    assert result["b_alone"]["arrived"] == result["b_beside"]["arrived"] == 10
    assert result["b_alone"]["missing"] == result["b_beside"]["missing"] == 0
    assert result["a"] | {"last_arrival_after_recovery_s": None} == {
        "accepted": 40,
        "arrived_while_hung": 0,
        "arrived": 40,
        "missing": 0,
        "duplicates": 0,
        "last_arrival_after_recovery_s": None,
    }
    assert result["b_duplicates"] == 0 and result["post_errors"] == {}
    # A's relay hung for 2.5 s: three failures of 0.5 s opened its circuit, which parked
    assert result["parked_while_hung"].get("breaker", 0) >= 1
    assert result["p99_ratio"] is not None
    a_tenant, b_tenant = result["run"]["tenants"]
    assert await notifications_of(db, a_tenant) == {"sent": 40}
    assert await notifications_of(db, b_tenant) == {"sent": 21}  # 10 + 10 + the probe
