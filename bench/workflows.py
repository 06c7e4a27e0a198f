"""`workflows`: N triggers of a three-step workflow, some runs read meanwhile; how late
does each step fire, and does each fire (or skip) exactly once?

The run, against a running notifyd and its PostgreSQL:

1. Set up a tenant of this run only (`bench-<run>`): an in-app template and the workflow
   `bench-escalation`, three in-app steps due `--delays` after the trigger (1 s, 3 s, 5 s by
   default), the second `unless: ["read"]`, the third `unless: ["read", "online"]`.
2. Trigger: N triggers through `POST /workflows/bench-escalation/trigger/`, one recipient
   each (`u-<i>`), at most `--concurrency` at once. Live (the default, `--lead 0`): paced
   evenly over `--spread` seconds, each run starting when it is answered, so steps fire
   while triggers arrive (a daemon saturated by them fires late). With `--lead L`: as fast
   as they are answered, each with `send_at` = start + L + its share of the spread, so the
   steps fire after the triggers are in, as `reminders` creates its reminders ahead
   (`started_after_send_at` counts triggers answered after their own `send_at`).
3. Read: for a `--read-share` of the runs, as soon as their first step's notification
   exists (polled from PostgreSQL every quarter second), the recipient marks it read over
   REST (`POST /notifications/mark-as-read/` with their own token), during the delays.
4. Wait until the last step is due, then until nothing of the run is pending or undelivered
   (bounded by `--margin`), then `--settle` seconds more for duplicates.
5. Read from PostgreSQL, in one REPEATABLE READ snapshot: every step's outcome and the
   daemon's own `lateness_ms` → p50/p99/max (overall and per step); `missing` = steps of
   accepted triggers still pending; `duplicates` = steps with more than one
   `workflow.step.*` audit row, notifications of the tenant no step recorded, or a step
   recording more than one; `read_violations` = steps that went although their run's first
   notification was read before their time, or were skipped as read although it was read
   only after they were done (the read is checked at the step's time: neither may happen).

Work the daemon still had before the run (workflow steps due within 10 minutes,
undelivered notifications, of any tenant) is reported as `backlog_at_start`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.common import (
    DEFAULT_URL,
    BenchError,
    TokenMinter,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    postgres_version,
    redis_version,
    require_loopback_url,
    summary,
)

WORKFLOW_KEY = "bench-escalation"
TEMPLATE_KEY = "bench_step"
SERVICE_USER = "bench-service"
ADMIN_USER = "bench-admin"
STEPS = 3
POLL_S = 0.25
REQUEST_TIMEOUT_S = 30.0


@dataclass(slots=True)
class WorkflowOptions:
    url: str = DEFAULT_URL
    database_url: str = ""
    jwt_secret: str = ""
    redis_url: str | None = None  # only to report the Redis version
    count: int = 10_000
    spread: float = 20.0
    lead: float = 0.0  # 0: live triggers; else send_at = start + lead + offset
    delays: tuple[float, float, float] = (1.0, 3.0, 5.0)
    read_share: float = 0.3
    concurrency: int = 16
    margin: float = 30.0
    settle: float = 2.0
    seed: int | None = None
    quiet: bool = False


def _delays(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("three seconds, comma-separated: 1,3,5") from None
    if len(values) != STEPS or any(v < 1 or v != int(v) for v in values):
        raise argparse.ArgumentTypeError("three whole numbers of seconds, each >= 1: 1,3,5")
    return values[0], values[1], values[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--database-url", "notifyd's PostgreSQL, to read the outcomes")
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint tokens")
    add_env_argument(parser, "--redis-url", "only to report the Redis version", default=None)
    parser.add_argument("--count", type=int, default=10_000, help="triggers (N)")
    parser.add_argument(
        "--spread", type=float, default=20.0, help="seconds the triggers are paced over"
    )
    parser.add_argument(
        "--lead",
        type=float,
        default=0.0,
        help="0: live triggers paced over the spread; else seconds from the start to the "
        "first send_at (each trigger's send_at spread over --spread after it)",
    )
    parser.add_argument(
        "--delays", type=_delays, default=(1.0, 3.0, 5.0), help="the steps' delays, seconds"
    )
    parser.add_argument(
        "--read-share", type=float, default=0.3, help="share of runs read during the delays"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP connections")
    parser.add_argument(
        "--margin", type=float, default=30.0, help="seconds to wait after the last due time"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to watch for duplicates at the end"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed of the reads")


def options_from(args: argparse.Namespace) -> WorkflowOptions:
    return options_of(WorkflowOptions, args)


def definition(delays: tuple[float, float, float]) -> dict[str, Any]:
    unless: list[list[str]] = [[], ["read"], ["read", "online"]]
    return {
        "category": "bench",
        "steps": [
            {
                "channel": "in_app",
                "template_key": TEMPLATE_KEY,
                "delay": f"{int(delay)}s",
                **({"unless": rule} if rule else {}),
            }
            for delay, rule in zip(delays, unless, strict=True)
        ],
    }


@dataclass(slots=True)
class _Run:
    options: WorkflowOptions
    session: aiohttp.ClientSession
    minter: TokenMinter
    tenant: str
    ttl: int
    service_headers: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        if not self.options.quiet:
            log(message)

    def headers(self, user_id: str, role: str) -> dict[str, str]:
        token = self.minter.mint(tenant_id=self.tenant, user_id=user_id, role=role, ttl=self.ttl)
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def call(
        self, method: str, path: str, body: Any, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """(status, decoded answer); status 0 with the error's name when the call failed."""
        try:
            async with self.session.request(
                method,
                self.options.url.rstrip("/") + path,
                data=orjson.dumps(body),
                headers=headers,
            ) as response:
                payload = await response.read()
                try:
                    return response.status, orjson.loads(payload) if payload else None
                except orjson.JSONDecodeError:
                    return response.status, payload[:200].decode(errors="replace")
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 0, type(exc).__name__


async def _set_up(run: _Run) -> None:
    admin = run.headers(ADMIN_USER, "admin")
    status, answer = await run.call(
        "PUT",
        f"/templates/{TEMPLATE_KEY}/in_app/",
        {"subject": "Step for {{ who }}", "text_body": "Hello {{ who }}"},
        admin,
    )
    if status != 200:
        raise BenchError(f"PUT /templates/{TEMPLATE_KEY}/in_app/: {status} {answer}")
    status, answer = await run.call(
        "PUT", f"/workflows/{WORKFLOW_KEY}/", definition(run.options.delays), admin
    )
    if status != 200:
        raise BenchError(f"PUT /workflows/{WORKFLOW_KEY}/: {status} {answer}")


@dataclass(slots=True)
class _Triggered:
    runs: dict[str, int]  # run id → recipient number, filled as the triggers are answered
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    last_at: float = 0.0  # epoch seconds of the last acknowledged trigger
    last_start: float = 0.0  # epoch seconds of the latest run start (answer or send_at)
    after_send_at: int = 0  # triggers answered after their own send_at


async def _trigger_all(run: _Run, triggered: _Triggered) -> None:
    """N triggers, at most `concurrency` in flight: live ones paced over the spread, or
    (with a lead) as fast as answered, each with its `send_at`."""
    o = run.options
    counter = itertools.count()
    began = time.monotonic()
    first_start = time.time() + o.lead
    interval = o.spread / o.count

    async def worker() -> None:
        while (i := next(counter)) < o.count:
            body: dict[str, Any] = {"recipients": [f"u-{i}"], "data": {"who": f"u-{i}"}}
            send_at = first_start + i * interval
            if o.lead > 0:
                body["send_at"] = datetime.fromtimestamp(send_at, UTC).isoformat()
            else:
                wait = began + i * interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            status, answer = await run.call(
                "POST", f"/workflows/{WORKFLOW_KEY}/trigger/", body, run.service_headers
            )
            if status == 202:
                triggered.runs[answer["runs"][0]["run_id"]] = i
                now = time.time()
                triggered.last_at = now
                start = send_at if o.lead > 0 else now
                triggered.last_start = max(triggered.last_start, start)
                if o.lead > 0 and now > send_at:
                    triggered.after_send_at += 1
            else:
                triggered.errors[f"{status}: {str(answer)[:80]}"] += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(o.concurrency, o.count)))))
    triggered.seconds = time.monotonic() - began


FIRST_NOTIFICATIONS = """
SELECT s.run_id::text AS run_id, s.notification_ids[1] AS id FROM workflow_steps s
WHERE s.tenant_id = $1 AND s.position = 0 AND s.status = 'sent'
  AND s.run_id = ANY($2::uuid[])
"""


async def _read_some(
    run: _Run,
    conn: asyncpg.Connection,
    triggered: _Triggered,
    chosen: set[int],
    stop: asyncio.Event,
) -> Counter[str]:
    """Until `stop`: each chosen run's first notification, as soon as it exists, marked
    read over REST by its recipient."""
    outcomes: Counter[str] = Counter()
    waiting: set[str] = set()
    seen: set[str] = set()
    while not stop.is_set():
        for run_id, number in list(triggered.runs.items()):
            if run_id not in seen:
                seen.add(run_id)
                if number in chosen:
                    waiting.add(run_id)
        if waiting:
            rows = await conn.fetch(FIRST_NOTIFICATIONS, run.tenant, list(waiting))
            calls = []
            for row in rows:
                waiting.discard(row["run_id"])
                user = f"u-{triggered.runs[row['run_id']]}"
                calls.append(
                    run.call(
                        "POST",
                        "/notifications/mark-as-read/",
                        {"ids": [str(row["id"])]},
                        run.headers(user, "user"),
                    )
                )
            size = run.options.concurrency
            for start in range(0, len(calls), size):
                for status, _ in await asyncio.gather(*calls[start : start + size]):
                    outcomes["read" if status == 200 else f"http {status}"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)
    outcomes["not_read"] = len(waiting)
    return outcomes


PROGRESS = """
SELECT count(*) FROM workflow_steps WHERE tenant_id = $1 AND status = 'pending'
"""

UNDELIVERED = """
SELECT count(*) FROM notifications
WHERE tenant_id = $1 AND status IN ('queued', 'dispatched', 'sending', 'retrying')
"""

BACKLOG = """
SELECT (SELECT count(*) FROM workflow_steps
        WHERE status = 'pending' AND due_at < now() + interval '10 minutes')
     + (SELECT count(*) FROM notifications
        WHERE status IN ('queued', 'dispatched', 'sending', 'retrying'))
"""

OUTCOMES = """
SELECT s.run_id::text AS run_id, s.position, s.status, s.reason, s.lateness_ms,
       cardinality(s.notification_ids) AS notes,
       EXTRACT(EPOCH FROM (s.done_at - s.due_at)) * 1000 AS raw_ms,
       s.due_at, s.done_at, first.read_at
FROM workflow_steps s
LEFT JOIN workflow_steps f ON f.run_id = s.run_id AND f.position = 0
LEFT JOIN notifications first
    ON first.tenant_id = s.tenant_id AND first.id = f.notification_ids[1]
WHERE s.tenant_id = $1
"""

AUDIT_REPEATS = """
SELECT details->>'run_id' AS run_id, details->>'position' AS position, count(*) AS n
FROM audit_log
WHERE tenant_id = $1 AND action LIKE 'workflow.step.%' AND action <> 'workflow.step.deferred'
GROUP BY 1, 2 HAVING count(*) > 1
"""

NOTIFICATIONS = "SELECT count(*) FROM notifications WHERE tenant_id = $1"

RECORDED_TWICE = """
SELECT count(*) FROM (
    SELECT u.id FROM workflow_steps s CROSS JOIN LATERAL unnest(s.notification_ids) AS u(id)
    WHERE s.tenant_id = $1 GROUP BY u.id HAVING count(*) > 1
) twice
"""


async def _wait(run: _Run, conn: asyncpg.Connection, last_due: float, deadline: float) -> None:
    """Until the last step is due, then until nothing of the run is pending or
    undelivered, never past `deadline` (epoch s)."""
    await asyncio.sleep(max(0.0, min(last_due, deadline) - time.time()))  # no queries meanwhile
    while time.time() < deadline:
        if (
            await conn.fetchval(PROGRESS, run.tenant) == 0
            and await conn.fetchval(UNDELIVERED, run.tenant) == 0
        ):
            return
        await asyncio.sleep(POLL_S * 2)
    run.say("the wait ended at its bound with work outstanding")


def _read_violation(row: asyncpg.Record) -> bool:
    """A step that ignored its run's read (read before its time, yet it went) or skipped on
    a read that came after it was done."""
    if row["position"] == 0 or row["status"] not in ("sent", "skipped"):
        return False
    read_at = row["read_at"]
    if row["status"] == "sent":
        return read_at is not None and read_at < row["due_at"]
    return row["reason"] == "read" and (read_at is None or read_at > row["done_at"])


async def main(options: WorkflowOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.count < 1 or o.spread <= 0 or o.concurrency < 1 or o.margin < 0 or o.lead < 0:
        raise BenchError("--count, --spread and --concurrency must be positive")
    if not 0 <= o.read_share <= 1:
        raise BenchError("--read-share is a share: 0 to 1")
    if not o.database_url:
        raise BenchError("--database-url (or DATABASE_URL) is needed to read the outcomes")
    require_loopback_url(o.url, "--url")
    require_loopback_url(o.database_url, "--database-url")
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    rng = random.Random(o.seed)
    chosen = set(rng.sample(range(o.count), round(o.count * o.read_share)))
    ttl = int(o.lead + o.spread + max(o.delays) + o.margin) + 3600
    conn = await asyncpg.connect(o.database_url)
    reader_conn = await asyncpg.connect(o.database_url)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=o.concurrency * 2),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    )
    try:
        run = _Run(o, session, TokenMinter(o.jwt_secret), tenant, ttl)
        run.service_headers = run.headers(SERVICE_USER, "service")
        backlog = int(await conn.fetchval(BACKLOG))
        if backlog:
            run.say(f"the daemon has {backlog} workflow steps/notifications of earlier work due")
        await _set_up(run)
        run.say(f"triggering {o.count} runs over {o.spread:.0f} s, {len(chosen)} to be read")
        triggered = _Triggered({})
        stop_reading = asyncio.Event()
        reading = asyncio.create_task(_read_some(run, reader_conn, triggered, chosen, stop_reading))
        try:
            await _trigger_all(run, triggered)
            run.say(
                f"triggered {len(triggered.runs)} in {triggered.seconds:.1f} s "
                f"({len(triggered.runs) / max(triggered.seconds, 1e-6):.0f}/s); "
                f"errors: {dict(triggered.errors)}"
            )
            last_due = triggered.last_start + max(o.delays)
            wait_began = time.monotonic()
            await _wait(run, conn, last_due, last_due + o.margin)
        finally:
            stop_reading.set()
            reads = await reading
        await asyncio.sleep(max(0.0, o.settle))  # the window a second firing would show in
        waited = time.monotonic() - wait_began

        snapshot = conn.transaction(isolation="repeatable_read", readonly=True)
        await snapshot.start()
        rows = await conn.fetch(OUTCOMES, tenant)
        repeats = await conn.fetch(AUDIT_REPEATS, tenant)
        notifications = int(await conn.fetchval(NOTIFICATIONS, tenant))
        recorded_twice = int(await conn.fetchval(RECORDED_TWICE, tenant))
        await snapshot.rollback()
        versions = {
            "postgresql": await postgres_version(conn),
            "redis": await redis_version(o.redis_url),
        }
    finally:
        await session.close()
        await reader_conn.close()
        await conn.close()

    accepted = set(triggered.runs)
    ours = [r for r in rows if r["run_id"] in accepted]
    recorded = sum(int(r["notes"]) for r in ours)
    done_rows = [r for r in ours if r["status"] in ("sent", "skipped")]
    lateness = [float(r["lateness_ms"]) for r in done_rows if r["lateness_ms"] is not None]
    per_step = {
        str(position): summary(
            [
                float(r["lateness_ms"])
                for r in done_rows
                if r["position"] == position and r["lateness_ms"] is not None
            ]
        )
        for position in range(STEPS)
    }
    over = sum(1 for r in ours if int(r["notes"]) > 1)
    unrecorded = max(0, notifications - recorded)
    statuses = Counter(f"{r['status']}" + (f"/{r['reason']}" if r["reason"] else "") for r in ours)
    return {
        "workload": "workflows",
        "count": o.count,
        "spread_s": o.spread,
        "lead_s": o.lead,
        "delays_s": list(o.delays),
        "read_share": o.read_share,
        "concurrency": o.concurrency,
        "triggered": len(triggered.runs),
        "trigger_errors": dict(triggered.errors),
        "trigger_s": round(triggered.seconds, 2),
        "triggered_per_s": round(len(triggered.runs) / max(triggered.seconds, 1e-6), 1),
        "started_after_send_at": triggered.after_send_at,
        "steps": len(ours),
        "fired": len(done_rows),
        "missing": STEPS * len(accepted) - len(done_rows),
        "duplicates": len(repeats) + over + unrecorded + recorded_twice,
        "duplicate_detail": {
            "audited_twice": len(repeats),
            "step_with_two_notifications": over,
            "unrecorded_notifications": unrecorded,
            "notification_in_two_steps": recorded_twice,
        },
        "statuses": dict(sorted(statuses.items())),
        "reads": dict(reads),
        "read_violations": sum(1 for r in ours if _read_violation(r)),
        "lateness_ms": summary(lateness),
        "lateness_ms_by_step": per_step,
        "notifications": notifications,
        "wait_s": round(waited, 2),
        "backlog_at_start": backlog,
        "run": {"tenant": tenant, "workflow_key": WORKFLOW_KEY, "url": o.url},
        "machine": {**machine(), **versions},
    }


__all__ = ["WorkflowOptions", "add_arguments", "main", "options_from"]
