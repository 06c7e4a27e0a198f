"""`reminders`: Q interview reminders spread over T seconds; how late does each one fire?

The run, against a running notifyd and its PostgreSQL:

1. Probe and warm up (unless `--lead` is given): a few reminders due a day from now are
   created over REST and cancelled again; their creation rate sets the lead, so creation is
   over before the first reminder is due.
2. Create: Q reminders through `POST /reminders/create/` with a service token of a tenant of
   this run only (`bench-<run>`), application ids `bench-<run>-r-<i>`, due at
   start + lead + uniform(0, T), interview a day later. No contacts: each makes 2 in-app
   notifications (candidate and employer). They are created in due order.
   Work the daemon still had before the run (reminders due within 10 minutes, undelivered
   notifications, of any tenant) is reported as `backlog_at_start`: figures are only
   comparable with it at 0.
3. Wait: until the last is due (no queries meanwhile: the harness shares the machine), then
   poll PostgreSQL until nothing of the run is scheduled or undelivered, bounded by
   last due + `--margin`; then watch `--settle` seconds more for duplicates.
4. Read from PostgreSQL: the daemon's own `lateness_ms` (fired minus due, recorded on the
   row) → p50/p99/max; `missing` = acknowledged reminders not fired by the end;
   `duplicates` = reminders fired more than once (more than one `reminder.fired` audit row)
   or with more notifications than a firing makes (2).

All reads of step 4 are made in one REPEATABLE READ snapshot, so a daemon still firing when
the wait ends at its bound cannot make the counts disagree with one another.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    postgres_version,
    redis_version,
    require_loopback_url,
    service_token,
    summary,
)

NOTIFICATIONS_PER_REMINDER = 2  # in-app to the candidate and to the employer
SERVICE_USER = "bench-service"
MIN_LEAD_S = 2.0
POLL_S = 0.5
REQUEST_TIMEOUT_S = 30.0
WARMUP_BOUND_S = 60.0


@dataclass(slots=True)
class ReminderOptions:
    url: str = DEFAULT_URL
    database_url: str = ""
    jwt_secret: str = ""
    redis_url: str | None = None  # only to report the Redis version
    count: int = 100_000
    spread: float = 60.0
    lead: float | None = None  # None: from the warm-up's creation rate
    concurrency: int = 16
    margin: float = 30.0
    settle: float = 2.0
    max_lead: float = 900.0
    seed: int | None = None
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--database-url", "notifyd's PostgreSQL, to read the outcomes")
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint a service token")
    add_env_argument(parser, "--redis-url", "only to report the Redis version", default=None)
    parser.add_argument("--count", type=int, default=100_000, help="reminders (Q)")
    parser.add_argument("--spread", type=float, default=60.0, help="seconds they spread over (T)")
    parser.add_argument(
        "--lead",
        type=float,
        default=None,
        help="seconds from the start of creation to the first possible due time "
        "(default: estimated from a warm-up so creation ends first)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP connections")
    parser.add_argument(
        "--margin", type=float, default=30.0, help="seconds to wait after the last due time"
    )
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to watch for duplicates at the end"
    )
    parser.add_argument(
        "--max-lead", type=float, default=900.0, help="upper bound of the estimated lead"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed of the due times")


def options_from(args: argparse.Namespace) -> ReminderOptions:
    return options_of(ReminderOptions, args)


def _rfc3339(when: datetime) -> str:
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


async def _for_each(
    n: int, concurrency: int, deadline: float, job: Callable[[int], Awaitable[None]]
) -> int:
    """`job(0 .. n-1)` on `concurrency` workers, stopping at the monotonic `deadline`;
    returns how many jobs ran."""
    counter = itertools.count()
    ran = 0

    async def worker() -> None:
        nonlocal ran
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= n:
                return
            await job(i)
            ran += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    return ran


@dataclass(slots=True)
class _Run:
    options: ReminderOptions
    session: aiohttp.ClientSession
    headers: dict[str, str]
    tenant: str
    prefix: str
    run_id: str

    @property
    def warmup_prefix(self) -> str:
        """Warm-up reminders: same tenant, outside `prefix`, so never in the figures."""
        return f"bench-{self.run_id}-w-"

    def say(self, message: str) -> None:
        if not self.options.quiet:
            log(message)

    def body(self, application_id: str, i: int, due: datetime) -> bytes:
        return orjson.dumps(
            {
                "application_id": application_id,
                "candidate_id": f"cand-{self.run_id}-{i}",
                "employer_id": f"emp-{self.run_id}-{i % 997}",
                "interview_time": _rfc3339(due + timedelta(days=1)),
                "reminder_time": _rfc3339(due),
            }
        )

    async def create(self, body: bytes) -> tuple[str | None, str | None]:
        """(reminder id, None) on 201, else (None, what went wrong)."""
        try:
            async with self.session.post(
                self.options.url.rstrip("/") + "/reminders/create/",
                data=body,
                headers=self.headers,
            ) as response:
                payload = await response.read()
                if response.status == 201:
                    return str(orjson.loads(payload)["reminder_id"]), None
                return None, f"http {response.status}: {payload[:200].decode(errors='replace')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, type(exc).__name__

    async def cancel(self, reminder_id: str) -> bool:
        try:
            async with self.session.delete(
                self.options.url.rstrip("/") + f"/reminders/{reminder_id}/", headers=self.headers
            ) as response:
                await response.read()
                return response.status == 204
        except (aiohttp.ClientError, TimeoutError):
            return False


async def _warm_up(run: _Run, size: int) -> tuple[float, int]:
    """Create `size` reminders due in a day (serially for the first, then concurrently),
    cancel them; returns (creations per second, warm-up reminders left uncancelled)."""
    far = datetime.now(UTC) + timedelta(days=1)
    ids: list[str | None] = [None] * size
    first_error: list[str] = []

    async def create(i: int) -> None:
        reminder_id, error = await run.create(run.body(f"{run.warmup_prefix}{i}", i, far))
        ids[i] = reminder_id
        if error and not first_error:
            first_error.append(error)

    await create(0)  # the probe: a refused token or a wrong URL stops the run here
    if ids[0] is None:
        raise BenchError(f"POST /reminders/create/ failed: {first_error[0]}")
    began = time.monotonic()
    ran = await _for_each(
        size - 1, run.options.concurrency, began + WARMUP_BOUND_S, lambda i: create(i + 1)
    )
    elapsed = max(1e-6, time.monotonic() - began)
    made = [i for i in ids if i is not None]
    if len(made) < size // 2:
        raise BenchError(f"warm-up: {size - len(made)} of {size} creations failed: {first_error}")
    rate = max(1, ran) / elapsed
    cancelled = 0

    async def cancel(i: int) -> None:
        nonlocal cancelled
        done = await run.cancel(made[i])  # not `+= await`: that would read before awaiting
        cancelled += done

    await _for_each(len(made), run.options.concurrency, time.monotonic() + WARMUP_BOUND_S, cancel)
    return rate, len(made) - cancelled


@dataclass(slots=True)
class _Created:
    ids: list[str | None]
    acked_at: list[float]  # epoch seconds of the acknowledgement, NaN when none
    errors: Counter[str]
    seconds: float


async def _create_rest(
    run: _Run, names: list[str], dues: list[datetime], deadline: float
) -> _Created:
    n = len(names)
    ids: list[str | None] = [None] * n
    acked_at = [math.nan] * n
    errors: Counter[str] = Counter()

    async def create(i: int) -> None:
        reminder_id, error = await run.create(run.body(names[i], i, dues[i]))
        if reminder_id is not None:
            ids[i] = reminder_id
            acked_at[i] = time.time()
        else:
            errors[(error or "?")[:80]] += 1

    began = time.monotonic()
    await _for_each(n, run.options.concurrency, deadline, create)
    return _Created(ids, acked_at, errors, time.monotonic() - began)


PROGRESS = """
SELECT count(*) FILTER (WHERE status = 'scheduled') AS scheduled,
       count(*) FILTER (WHERE status = 'fired') AS fired
FROM interview_reminders WHERE tenant_id = $1 AND starts_with(application_id, $2)
"""

# Work the daemon still has from before this run (any tenant) would load it during the run.
BACKLOG = """
SELECT (SELECT count(*) FROM interview_reminders
        WHERE status = 'scheduled' AND reminder_time < now() + interval '10 minutes')
     + (SELECT count(*) FROM notifications
        WHERE status IN ('queued', 'dispatched', 'sending', 'retrying'))
"""

UNDELIVERED = """
SELECT count(*) FROM notifications
WHERE tenant_id = $1 AND status IN ('queued', 'dispatched', 'sending', 'retrying')
"""

OUTCOMES = """
SELECT id::text AS id, application_id, status, lateness_ms,
       EXTRACT(EPOCH FROM (fired_at - reminder_time)) * 1000 AS raw_ms,
       cardinality(notification_ids) AS notes
FROM interview_reminders WHERE tenant_id = $1 AND starts_with(application_id, $2)
"""

FIRED_AUDIT_REPEATS = """
SELECT details->>'reminder_id' AS id, count(*) AS n FROM audit_log
WHERE tenant_id = $1 AND action = 'reminder.fired'
GROUP BY 1 HAVING count(*) > 1
"""

NOTIFICATIONS_PER_APPLICATION = """
SELECT context->>'application_id' AS application_id, count(*) AS n FROM notifications
WHERE tenant_id = $1 AND template_key = 'interview_reminder'
GROUP BY 1
"""

DELIVERED = """
SELECT n.status, EXTRACT(EPOCH FROM (n.sent_at - r.reminder_time)) * 1000 AS ms
FROM interview_reminders r
CROSS JOIN LATERAL unnest(r.notification_ids) AS u(nid)
JOIN notifications n ON n.id = u.nid
WHERE r.tenant_id = $1 AND starts_with(r.application_id, $2)
"""


async def _wait(run: _Run, conn: asyncpg.Connection, last_due: float, deadline: float) -> None:
    """Until the last reminder is due (no queries: they would load the shared machine), then
    until nothing of the run is scheduled or undelivered, never past `deadline` (epoch s)."""
    next_note = time.time() + 10
    while (now := time.time()) < min(last_due, deadline):
        if now >= next_note:
            run.say(f"waiting: last reminder due in {last_due - now:.0f} s")
            next_note = now + 10
        await asyncio.sleep(min(1.0, max(0.0, last_due - now)))
    while time.time() < deadline:
        progress = await conn.fetchrow(PROGRESS, run.tenant, run.prefix)
        assert progress is not None
        if progress["scheduled"] == 0 and await conn.fetchval(UNDELIVERED, run.tenant) == 0:
            return
        await asyncio.sleep(POLL_S)
    run.say("the wait ended at its bound with work outstanding")


async def _settle(seconds: float) -> None:
    """The window in which a second firing would show; a measurement window, not a guess."""
    await asyncio.sleep(max(0.0, seconds))


async def main(options: ReminderOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.count < 1 or o.spread <= 0 or o.concurrency < 1 or o.margin < 0:
        raise BenchError("--count, --spread and --concurrency must be positive")
    if not o.database_url:
        raise BenchError("--database-url (or DATABASE_URL) is needed to read the outcomes")
    require_loopback_url(o.url, "--url")
    require_loopback_url(o.database_url, "--database-url")
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    prefix = f"bench-{run_id}-r-"
    rng = random.Random(o.seed)
    horizon = (o.lead if o.lead is not None else o.max_lead) + o.spread + o.margin + 600
    token = service_token(
        o.jwt_secret, tenant_id=tenant, user_id=SERVICE_USER, ttl=int(horizon) + 3600
    )
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn = await asyncpg.connect(o.database_url)
    connector = aiohttp.TCPConnector(limit=o.concurrency)
    session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    )
    try:
        run = _Run(o, session, headers, tenant, prefix, run_id)
        backlog = int(await conn.fetchval(BACKLOG))
        if backlog:
            run.say(f"the daemon has {backlog} reminders/notifications of earlier work due")
        warmup_rate: float | None = None
        warmup_left = 0
        if o.lead is None:
            size = min(2000, max(20, o.count // 50))
            warmup_rate, warmup_left = await _warm_up(run, size)
            estimate = o.count / warmup_rate * 1.3 + 2
            lead = min(o.max_lead, max(MIN_LEAD_S, math.ceil(estimate)))
            run.say(f"warm-up: {warmup_rate:.0f} creations/s over REST; lead {lead:.0f} s")
        else:
            lead = o.lead
            _, warmup_left = await _warm_up(run, 1)  # the probe alone
        start = datetime.now(UTC)
        offsets = sorted(rng.uniform(0, o.spread) for _ in range(o.count))
        dues = [start + timedelta(seconds=lead + offset) for offset in offsets]
        names = [f"{prefix}{i:07d}" for i in range(o.count)]
        last_due = dues[-1].timestamp()
        # creating past the last due time measures nothing; the bound of the creation phase
        create_deadline = time.monotonic() + lead + o.spread
        run.say(f"creating {o.count} reminders over REST")
        created = await _create_rest(run, names, dues, create_deadline)
        acked = [i for i, rid in enumerate(created.ids) if rid is not None]
        created_after_due = sum(1 for i in acked if created.acked_at[i] > dues[i].timestamp())
        run.say(
            f"created {len(acked)} in {created.seconds:.1f} s "
            f"({len(acked) / max(created.seconds, 1e-6):.0f}/s), "
            f"{created_after_due} after their due time; errors: {dict(created.errors)}"
        )
        wait_began = time.monotonic()
        await _wait(run, conn, last_due, last_due + o.margin)
        await _settle(o.settle)
        waited = time.monotonic() - wait_began

        snapshot = conn.transaction(isolation="repeatable_read", readonly=True)
        await snapshot.start()
        rows = await conn.fetch(OUTCOMES, tenant, prefix)
        fired_rows = [r for r in rows if r["status"] == "fired"]
        fired_ids = {r["id"] for r in fired_rows}
        missing = sum(1 for i in acked if created.ids[i] not in fired_ids)
        repeated = {r["id"] for r in await conn.fetch(FIRED_AUDIT_REPEATS, tenant)}
        app_to_id = {r["application_id"]: r["id"] for r in rows}
        notes = await conn.fetch(NOTIFICATIONS_PER_APPLICATION, tenant)
        over = {
            app_to_id.get(n["application_id"], n["application_id"])
            for n in notes
            if n["n"] > NOTIFICATIONS_PER_REMINDER
        }
        notification_rows = sum(int(n["n"]) for n in notes)
        recorded = sum(int(r["notes"]) for r in rows)
        delivered = await conn.fetch(DELIVERED, tenant, prefix)
        await snapshot.rollback()
        sent = [float(d["ms"]) for d in delivered if d["ms"] is not None]
        lateness = [float(r["lateness_ms"]) for r in fired_rows if r["lateness_ms"] is not None]
        raw = [float(r["raw_ms"]) for r in fired_rows if r["raw_ms"] is not None]
        versions = {
            "postgresql": await postgres_version(conn),
            "redis": await redis_version(o.redis_url),
        }
    finally:
        await session.close()
        await conn.close()

    statuses = Counter(r["status"] for r in rows)
    return {
        "workload": "reminders",
        "path": "rest",
        "count": o.count,
        "spread_s": o.spread,
        "lead_s": lead,
        "concurrency": o.concurrency,
        "warmup_created_per_s": None if warmup_rate is None else round(warmup_rate, 1),
        "created": len(acked),
        "create_errors": dict(created.errors),
        "create_s": round(created.seconds, 2),
        "created_per_s": round(len(acked) / max(created.seconds, 1e-6), 1),
        "created_after_due": created_after_due,
        "fired": len(fired_rows),
        "missing": missing,
        "duplicates": len(repeated | over) + max(0, notification_rows - recorded),
        "statuses": dict(statuses),
        "lateness_ms": summary(lateness),
        "earliest_ms": round(min(raw), 1) if raw else None,
        "notifications": notification_rows,
        "notifications_sent": sum(1 for d in delivered if d["status"] == "sent"),
        "delivered_ms": summary(sent),
        "duplicate_detail": {
            "fired_twice": len(repeated),
            "over_notified": len(over),
            "unrecorded_notifications": max(0, notification_rows - recorded),
        },
        "wait_s": round(waited, 2),
        "backlog_at_start": backlog,
        "warmup_left_scheduled": warmup_left,
        "run": {"tenant": tenant, "application_prefix": prefix, "url": o.url},
        "machine": {**machine(), **versions},
    }


__all__ = ["ReminderOptions", "add_arguments", "main", "options_from"]
