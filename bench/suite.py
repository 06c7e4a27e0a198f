"""`all`: `limits`, then every workload at a modest size, then each figure beside its ceiling.

Order: limits, connections (first on the daemon: memory freed by earlier work would be
reused without growing its RSS), rest_ingest, email_e2e, ws_fanout (burst), ws_fanout (paced
at half the burst's delivered rate), reminders, workflows (`--workflows` triggers of the
three-step workflow, `send_at` from `--workflows-lead` seconds on). Each prints its own
JSON line as it ends (a workload that cannot run prints `{"workload": …, "error": …}` and the
others still run).
Before each workload the harness waits, at most `--backlog-bound` seconds, until the daemon
has no undelivered notifications and no reminders due within 10 minutes (work a previous
workload left, e.g. the in-app deliveries of `rest_ingest`), and records what was left as
`backlog_at_start`.

Then one line per figure: `{"workload": "all", "figure": …, "value": …, "ceiling": …,
"ceiling_value": …, "ratio": …}` for rest_ingest.req_per_s ÷ limits.http_req_per_s,
rest_ingest.req_per_s ÷ limits.pg_xadd_rows_per_s, email_e2e.per_s ÷ limits.smtp_per_s and
ws_fanout.delivered_per_s ÷ limits.ws_delivered_per_s.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg

from bench import connections, email_e2e, limits, reminders, rest_ingest, workflows, ws_fanout
from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    ratio,
    require_loopback_url,
)

RATIOS = (
    ("rest_ingest", "req_per_s", "http_req_per_s"),
    ("rest_ingest", "req_per_s", "pg_xadd_rows_per_s"),
    ("email_e2e", "per_s", "smtp_per_s"),
    ("ws_fanout", "delivered_per_s", "ws_delivered_per_s"),
)
POLL_S = 1.0
WORKLOADS = (
    "limits",
    "connections",
    "rest_ingest",
    "email_e2e",
    "ws_fanout",
    "reminders",
    "workflows",
)


@dataclass(slots=True)
class SuiteOptions:
    url: str = DEFAULT_URL
    database_url: str = ""
    redis_url: str = ""
    jwt_secret: str = ""
    smtp_port: int = email_e2e.DEFAULT_SMTP_PORT
    pid: int | None = None
    duration: float = 10.0
    http_connections: int = 32
    emails: int = 1000
    rooms: int = 10
    members: int = 10
    messages: int = 50
    connections: int = 1000
    hold: float = 10.0
    pg_rows: int = 20_000
    reminders: int = 2000
    reminders_spread: float = 10.0
    workflows: int = 3000
    workflows_lead: float = 10.0
    workflows_spread: float = 20.0
    skip: tuple[str, ...] = ()
    backlog_bound: float = 180.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--database-url", "notifyd's PostgreSQL")
    add_env_argument(parser, "--redis-url", "notifyd's Redis")
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET")
    email_e2e.add_sink_argument(parser)
    parser.add_argument(
        "--pid",
        type=int,
        default=None,
        help="notifyd's pid (connections; rest_ingest's CPU per request)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="HTTP load seconds")
    parser.add_argument("--http-connections", type=int, default=32, help="HTTP connections")
    parser.add_argument("--emails", type=int, default=1000, help="email_e2e: K")
    parser.add_argument("--rooms", type=int, default=10, help="ws_fanout: R")
    parser.add_argument("--members", type=int, default=10, help="ws_fanout: M")
    parser.add_argument(
        "--messages",
        type=int,
        default=50,
        help="ws_fanout: S per sender (R x M x S x M deliveries)",
    )
    parser.add_argument("--connections", type=int, default=1000, help="connections: N")
    parser.add_argument("--hold", type=float, default=10.0, help="connections: seconds held")
    parser.add_argument(
        "--pg-rows", type=int, default=20_000, help="limits: rows per PostgreSQL phase"
    )
    parser.add_argument("--reminders", type=int, default=2000, help="reminders: Q")
    parser.add_argument("--reminders-spread", type=float, default=10.0, help="reminders: T seconds")
    parser.add_argument("--workflows", type=int, default=3000, help="workflows: N triggers")
    parser.add_argument(
        "--workflows-lead",
        type=float,
        default=10.0,
        help="workflows: seconds from the start to the first send_at (0: live triggers)",
    )
    parser.add_argument(
        "--workflows-spread", type=float, default=20.0, help="workflows: seconds of send_at"
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated workloads to leave out ({', '.join(WORKLOADS)})",
    )
    parser.add_argument(
        "--backlog-bound",
        type=float,
        default=180.0,
        help="seconds to wait, at most, for the daemon's backlog before each workload",
    )


def options_from(args: argparse.Namespace) -> SuiteOptions:
    skip = tuple(s.strip() for s in args.skip.split(",") if s.strip())
    unknown = set(skip) - set(WORKLOADS)
    if unknown:
        raise BenchError(f"--skip: unknown workloads {sorted(unknown)}")
    return options_of(SuiteOptions, args, skip=skip)


async def _wait_for_backlog(database_url: str, bound: float) -> int:
    """Until the daemon has no backlog (see reminders.BACKLOG) or `bound` seconds; returns
    the backlog left."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + bound
        while True:
            left = int(await conn.fetchval(reminders.BACKLOG))
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(POLL_S)  # the daemon's own progress: nothing to wait on
    finally:
        await conn.close()


async def main(
    options: SuiteOptions, emit: Callable[[dict[str, Any]], None]
) -> list[dict[str, Any]]:
    """Run everything; `emit` gets each line as it is ready. Returns every line."""
    o = options
    if not o.database_url or not o.redis_url:
        raise BenchError("--database-url and --redis-url (or DATABASE_URL, REDIS_URL) are needed")
    require_loopback_url(o.url, "--url")
    require_loopback_url(o.database_url, "--database-url")
    lines: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}

    async def step(name: str, run: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        workload = name.split(":")[0]
        if workload in o.skip:
            return
        backlog = (
            0 if workload == "limits" else await _wait_for_backlog(o.database_url, o.backlog_bound)
        )
        if not o.quiet:
            log(f"all: {name}")
        try:
            result = await run()
        except (BenchError, aiohttp.ClientError, asyncpg.PostgresError, OSError) as exc:
            result = {"workload": workload, "error": str(exc) or type(exc).__name__}
            result["machine"] = machine()
        else:
            results.setdefault(workload, result)
        if workload != "limits":
            result = {**result, "backlog_at_start": backlog}
        lines.append(result)
        emit(result)

    await step(
        "limits",
        lambda: limits.main(
            limits.LimitsOptions(
                database_url=o.database_url,
                redis_url=o.redis_url,
                jwt_secret=o.jwt_secret,
                http_connections=o.http_connections,
                http_duration=o.duration,
                ws_rooms=o.rooms,
                ws_members=o.members,
                ws_messages=o.messages,
                pg_rows=o.pg_rows,
                smtp_count=o.emails,
                quiet=o.quiet,
            )
        ),
    )
    await step(
        "connections",
        lambda: connections.main(
            connections.ConnectionsOptions(
                url=o.url,
                jwt_secret=o.jwt_secret,
                count=o.connections,
                hold=o.hold,
                pid=o.pid,
                quiet=o.quiet,
            )
        ),
    )
    await step(
        "rest_ingest",
        lambda: rest_ingest.main(
            rest_ingest.IngestOptions(
                url=o.url,
                jwt_secret=o.jwt_secret,
                connections=o.http_connections,
                duration=o.duration,
                quiet=o.quiet,
                pid=o.pid,
            )
        ),
    )
    await step(
        "email_e2e",
        lambda: email_e2e.main(
            email_e2e.EmailOptions(
                url=o.url,
                jwt_secret=o.jwt_secret,
                smtp_port=o.smtp_port,
                count=o.emails,
                quiet=o.quiet,
            )
        ),
    )
    fanout = ws_fanout.FanoutOptions(
        url=o.url,
        jwt_secret=o.jwt_secret,
        rooms=o.rooms,
        members=o.members,
        messages=o.messages,
        quiet=o.quiet,
    )
    await step("ws_fanout", lambda: ws_fanout.main(fanout))
    burst = results.get("ws_fanout", {}).get("delivered_per_s")
    if burst:
        fanout.rate = round(burst / 2, 1)
        await step("ws_fanout:paced", lambda: ws_fanout.main(fanout))
    await step(
        "reminders",
        lambda: reminders.main(
            reminders.ReminderOptions(
                url=o.url,
                database_url=o.database_url,
                jwt_secret=o.jwt_secret,
                redis_url=o.redis_url,
                count=o.reminders,
                spread=o.reminders_spread,
                quiet=o.quiet,
            )
        ),
    )
    await step(
        "workflows",
        lambda: workflows.main(
            workflows.WorkflowOptions(
                url=o.url,
                database_url=o.database_url,
                jwt_secret=o.jwt_secret,
                redis_url=o.redis_url,
                count=o.workflows,
                lead=o.workflows_lead,
                spread=o.workflows_spread,
                quiet=o.quiet,
            )
        ),
    )

    ceilings = results.get("limits", {})
    for workload, figure, ceiling in RATIOS:
        value = results.get(workload, {}).get(figure)
        bound = ceilings.get(ceiling)
        line = {
            "workload": "all",
            "figure": f"{workload}.{figure}",
            "value": value,
            "ceiling": f"limits.{ceiling}",
            "ceiling_value": bound,
            "ratio": ratio(value, bound),
            "machine": machine(),
        }
        lines.append(line)
        emit(line)
    return lines


__all__ = ["SuiteOptions", "add_arguments", "main", "options_from"]
