"""`retention`: does purging a million expired rows slow the request path? `rest_ingest`'s
p99 with the purge running, beside its p99 without, in alternating pairs.

Each pair has two runs of `rest_ingest` of the same length (`--duration`), in alternating
order (alone first in even pairs, with the purge first in odd ones):
- alone: no expired rows exist, nothing is purged;
- with the purge: first (not measured) `--rows` notifications in a final state, 400 days
  old, are generated in one `INSERT … SELECT … generate_series` and the table vacuumed, so
  the run starts from a settled table; then the purge starts
  (`notifyd.actors.housekeeper.Housekeeper.purge_expired`, notifyd's own code, with
  `--batch` and `--pause`) together with the load, and keeps going past it if it must; the
  harness then waits for it to end and vacuums (not measured) before the next run.

Figures per pair: `alone_p99_ms`, `with_purge_p99_ms`, their `ratio`, the requests per
second of both, `purged` (rows the purge deleted by the load's end, and in all) and
`purge_s`. Overall: `ratio_max` and `ratio_median` (the issue's target: within 1.5x).

The purge deletes every final-state notification older than `--retain-days` (300) in the
database it is given, as notifyd's housekeeper would with that retention: run it on a
benchmark stack. Start the daemon with `NOTIFYD_RETAIN_NOTIFICATIONS=0`: one instance purges
a family at a time (an advisory lock), so a daemon purging the generated rows itself (they
are older than its 90-day default) would leave the harness's purge nothing to do, and the
figures would be those of the daemon's settings (`purged` shows what the harness deleted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from bench import rest_ingest
from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    require_loopback_url,
)
from notifyd.actors.housekeeper import Housekeeper, Retention
from notifyd.metrics import Metrics

DAY = 86_400.0
AGE_DAYS = 400

# `$1` tenant, `$2` rows: final-state in-app notifications, AGE_DAYS old, with UUIDv7 ids
# of that time (one millisecond apart, so the primary key orders them as notifyd's own)
FILL = f"""
INSERT INTO notifications (id, tenant_id, created_by, user_id, channel, recipient, body,
                           status, created_at, updated_at, sent_at)
SELECT (lpad(to_hex(s.ms), 12, '0') || '7' || lpad(to_hex(s.g % 4096), 3, '0') || '8'
        || lpad(to_hex(s.g), 15, '0'))::uuid,
       $1, 'bench-retention', 'u' || (s.g % 1000), 'in_app', 'u' || (s.g % 1000),
       'expired', 'sent', s.at, s.at, s.at
FROM (SELECT g, t0 + g AS ms, to_timestamp((t0 + g) / 1000.0) AS at
      FROM generate_series(1, $2::bigint) AS g,
           (SELECT (extract(epoch FROM now() - interval '{AGE_DAYS} days') * 1000)::bigint
            AS t0) AS base) AS s
"""
LEFT = "SELECT EXISTS (SELECT 1 FROM notifications WHERE tenant_id = $1 AND id < $2)"


@dataclass(slots=True)
class RetentionOptions:
    url: str = DEFAULT_URL
    database_url: str = ""
    jwt_secret: str = ""
    rows: int = 1_000_000
    pairs: int = 3
    duration: float = 30.0
    connections: int = 32
    generator: str = "auto"
    batch: int = 1000
    pause: float = 0.1
    retain_days: float = 300.0
    purge_bound: float = 1800.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--database-url", "notifyd's PostgreSQL")
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET")
    parser.add_argument("--rows", type=int, default=1_000_000, help="expired rows per purge")
    parser.add_argument("--pairs", type=int, default=3, help="alternating pairs of runs")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32, help="rest_ingest connections")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--batch", type=int, default=1000, help="rows per DELETE")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between DELETEs")
    parser.add_argument("--retain-days", type=float, default=300.0, help="the purge's cutoff")
    parser.add_argument(
        "--purge-bound", type=float, default=1800.0, help="seconds a purge may take at most"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def options_from(args: argparse.Namespace) -> RetentionOptions:
    return options_of(RetentionOptions, args)


async def _ingest(o: RetentionOptions) -> dict[str, Any]:
    return await rest_ingest.main(
        rest_ingest.IngestOptions(
            url=o.url,
            jwt_secret=o.jwt_secret,
            connections=o.connections,
            duration=o.duration,
            generator=o.generator,
            quiet=True,
            drain_bound=30.0,
        )
    )


async def _fill(pool: asyncpg.Pool, tenant: str, rows: int) -> None:
    async with pool.acquire() as conn:
        await conn.execute(FILL, tenant, rows, timeout=None)
        await conn.execute("VACUUM (ANALYZE) notifications", timeout=None)


async def _with_purge(
    o: RetentionOptions, pool: asyncpg.Pool, tenant: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The load with the purge running from its start; the purge's own figures."""
    await _fill(pool, tenant, o.rows)
    metrics = Metrics()
    housekeeper = Housekeeper(
        pool,
        ttl=DAY,
        interval=60.0,
        retention=Retention(notifications=o.retain_days * DAY, batch=o.batch, pause=o.pause),
        metrics=metrics,
    )
    started = time.perf_counter()
    purge = asyncio.create_task(housekeeper.purge_expired())
    ingest = await _ingest(o)
    purged_during = int(metrics.retention_purged.labels("notifications")._value.get())
    try:
        deleted = await asyncio.wait_for(purge, timeout=o.purge_bound)
    except TimeoutError:
        raise BenchError(f"the purge took longer than --purge-bound {o.purge_bound:g} s") from None
    purge_s = time.perf_counter() - started
    # the daemon's own housekeeper may still hold a batch of them: wait until none is left
    horizon = uuid.UUID(int=int((time.time() - (AGE_DAYS - 1) * DAY) * 1000) << 80)
    deadline = time.monotonic() + o.purge_bound
    while await pool.fetchval(LEFT, tenant, horizon):
        if time.monotonic() > deadline:
            raise BenchError("the generated rows were not all purged in time")
        await asyncio.sleep(0.5)
    async with pool.acquire() as conn:
        await conn.execute("VACUUM (ANALYZE) notifications", timeout=None)
    return ingest, {
        "purged": deleted.get("notifications", 0),
        "purged_during_load": purged_during,
        "purge_s": round(purge_s, 1),
    }


async def main(options: RetentionOptions) -> dict[str, Any]:
    o = options
    require_loopback_url(o.url, "--url")
    if not o.database_url:
        raise BenchError("--database-url (or $DATABASE_URL) is needed to generate the rows")
    require_loopback_url(o.database_url, "--database-url")
    if o.rows < 1 or o.pairs < 1:
        raise BenchError("--rows and --pairs must be positive")
    tenant = f"bench-retention-{os.getpid()}"
    pairs: list[dict[str, Any]] = []
    pool = await asyncpg.create_pool(o.database_url, min_size=1, max_size=4)
    try:
        for n in range(o.pairs):
            runs: dict[str, dict[str, Any]] = {}
            for kind in ("alone", "with_purge") if n % 2 == 0 else ("with_purge", "alone"):
                if not o.quiet:
                    log(f"pair {n + 1}/{o.pairs}: {kind}")
                if kind == "alone":
                    runs[kind] = await _ingest(o)
                else:
                    runs[kind], purge = await _with_purge(o, pool, tenant)
            alone, loaded = runs["alone"], runs["with_purge"]
            pairs.append(
                {
                    "order": "alone first" if n % 2 == 0 else "purge first",
                    "alone_p99_ms": alone.get("p99_ms"),
                    "with_purge_p99_ms": loaded.get("p99_ms"),
                    "ratio": _ratio(loaded.get("p99_ms"), alone.get("p99_ms")),
                    "alone_req_per_s": alone.get("req_per_s"),
                    "with_purge_req_per_s": loaded.get("req_per_s"),
                    "errors": (alone.get("errors") or 0) + (loaded.get("errors") or 0),
                    **purge,
                }
            )
    finally:
        await pool.close()
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {
        "workload": "retention",
        "rows": o.rows,
        "batch": o.batch,
        "pause_s": o.pause,
        "duration_s": o.duration,
        "connections": o.connections,
        "pairs": pairs,
        "ratio_max": max(ratios) if ratios else None,
        "ratio_median": round(statistics.median(ratios), 2) if ratios else None,
        "machine": machine(),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 2) if value is not None and base else None


__all__ = ["RetentionOptions", "add_arguments", "main", "options_from"]
