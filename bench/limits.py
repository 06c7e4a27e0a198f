"""`limits`: the ceilings, measured with no notifyd code in the path, on the same machine.

Each figure is the same work as a workload with nothing of notifyd in it; a workload's
figure divided by its ceiling (`python -m bench all` prints those ratios) says how much of
the machine's capacity notifyd turns into useful work. The servers run in a process of
their own (`bench.servers`), as notifyd would.

- `http_req_per_s`: a bare aiohttp + uvloop handler answering 202 to the same
  `POST /notifications/send/`, under the same load generator, connections and duration as
  `rest_ingest` (`--http-*`).
- `ws_delivered_per_s`: a bare aiohttp WebSocket server that encodes each message once and
  sends it to every member of its room, loaded by `ws_fanout`'s own client (burst) with the
  same rooms and members (`--ws-*`).
- `pg_xadd_rows_per_s`: asyncpg inserting rows shaped like a notification (a scratch table
  with the `notifications` columns and indexes, ids UUIDv7, in the `--database-url`
  database) in batches of 64 rows, one `INSERT … SELECT FROM unnest(…)` per batch, each
  followed by one pipelined round trip of 64 `XADD`s (`MAXLEN ~`) to a scratch stream on
  `--redis-url`; `--pg-concurrency` connections. `pg_xadd_rows_per_s_single` does the same
  one row per round trip (one INSERT, then one XADD). Both are checked afterwards (rows in
  the table, entries in the stream) and the table and stream are dropped.
- `smtp_per_s`: aiosmtplib over a pool of `--smtp-connections` connections into the same
  aiosmtpd sink `email_e2e` uses, `--smtp-count` messages shaped like notifyd's; until the
  sink has them all.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import aiosmtplib
import asyncpg
from redis.asyncio import Redis

from bench import loadgen, ws_fanout
from bench.common import (
    BenchError,
    TokenMinter,
    add_env_argument,
    all_or_none,
    log,
    machine,
    options_of,
    postgres_version,
    redis_version,
    require_loopback_url,
)
from bench.rest_ingest import add_load_arguments
from bench.spawn import BareServer, MailLog

BATCH = 64
STREAM_MAX_LEN = 1_000_000
UNVERIFIED_SECRET = "bench-limits-tokens-are-never-verified"
SMTP_TIMEOUT_S = 30.0

# the columns and indexes of notifyd's `notifications` (notifyd/sql/0001, 0002, 0008), alone
SCRATCH_TABLE = """
CREATE TABLE {table} (
    id uuid PRIMARY KEY, tenant_id text NOT NULL, created_by text NOT NULL, user_id text,
    channel text NOT NULL, recipient text NOT NULL, subject text, body text, html_body text,
    template_key text, context jsonb, locale text, category text,
    critical boolean NOT NULL DEFAULT false, status text NOT NULL DEFAULT 'queued',
    attempts integer NOT NULL DEFAULT 0, last_error text, idempotency_key text,
    request_id text, provider_message_id text, provider_status text, claimed_at timestamptz,
    next_attempt_at timestamptz, delivered_at timestamptz, read_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);
CREATE INDEX ON {table} (tenant_id, user_id, id DESC) WHERE user_id IS NOT NULL;
CREATE INDEX ON {table} (tenant_id, user_id)
    WHERE read_at IS NULL AND channel = 'in_app' AND status <> 'suppressed';
CREATE INDEX ON {table} (tenant_id, created_by, id DESC);
CREATE INDEX ON {table} (updated_at)
    WHERE status IN ('queued', 'dispatched', 'sending', 'retrying');
"""
COLUMNS = "id, tenant_id, created_by, user_id, channel, recipient, body, request_id"
INSERT_BATCH = f"""
INSERT INTO {{table}} ({COLUMNS})
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[])
"""
INSERT_ONE = f"INSERT INTO {{table}} ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"


@dataclass(slots=True)
class LimitsOptions:
    database_url: str = ""
    redis_url: str = ""
    jwt_secret: str = ""  # only so the tokens the bare servers see are shaped like real ones
    http_connections: int = 32
    http_duration: float = 10.0
    http_threads: int = 1
    http_generator: str = "auto"
    http_recipients: int = 1000
    ws_rooms: int = 10
    ws_members: int = 10
    ws_messages: int = 10
    ws_senders: int = 0
    ws_size: int = 64
    ws_connect_concurrency: int = 64
    ws_drain: float = 10.0
    pg_rows: int = 50_000
    pg_seconds: float = 10.0
    pg_concurrency: int = 8
    smtp_count: int = 2000
    smtp_connections: int = 8
    smtp_margin: float = 60.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_env_argument(parser, "--database-url", "a PostgreSQL (loopback) for the scratch table")
    add_env_argument(parser, "--redis-url", "a Redis (loopback) for the scratch stream")
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("JWT_SECRET", ""),
        help="optional: tokens shaped like notifyd's (the bare servers never verify them)",
    )
    add_load_arguments(parser, "http-")
    ws_fanout.add_shape_arguments(parser, "ws-")
    parser.add_argument("--pg-rows", type=int, default=50_000, help="rows per phase, at most")
    parser.add_argument("--pg-seconds", type=float, default=10.0, help="seconds per phase, at most")
    parser.add_argument("--pg-concurrency", type=int, default=8, help="PostgreSQL connections")
    parser.add_argument("--smtp-count", type=int, default=2000, help="messages")
    parser.add_argument("--smtp-connections", type=int, default=8, help="SMTP connections")
    parser.add_argument(
        "--smtp-margin", type=float, default=60.0, help="seconds to wait for the sink"
    )


def options_from(args: argparse.Namespace) -> LimitsOptions:
    return options_of(LimitsOptions, args)


async def _http(o: LimitsOptions, minter: TokenMinter, run_id: str) -> dict[str, Any]:
    token = minter.mint(
        tenant_id=f"bench-{run_id}", user_id="bench-service", role="service", ttl=3600
    )
    async with BareServer("http") as server:
        return await loadgen.run(
            loadgen.Load(
                url=f"http://127.0.0.1:{server.port}",
                token=token,
                recipient_prefix=f"bench-{run_id}-u",
                recipients=o.http_recipients,
                connections=o.http_connections,
                duration=o.http_duration,
                threads=o.http_threads,
                generator=o.http_generator,
            )
        )


async def _ws(o: LimitsOptions, secret: str, user_claim: str) -> dict[str, Any]:
    async with BareServer("ws", "--user-claim", user_claim) as server:
        result = await ws_fanout.main(
            ws_fanout.FanoutOptions(
                url=f"http://127.0.0.1:{server.port}",
                jwt_secret=secret,
                rooms=o.ws_rooms,
                members=o.ws_members,
                messages=o.ws_messages,
                senders=o.ws_senders,
                size=o.ws_size,
                connect_concurrency=o.ws_connect_concurrency,
                drain=o.ws_drain,
                quiet=True,
            )
        )
    keep = (
        "delivered_per_s",
        "delivered",
        "expected",
        "lost",
        "duplicates",
        "p50_ms",
        "p99_ms",
        "setup_per_s",
        "sockets",
    )
    return {k: result[k] for k in keep}


class _Uuid7:
    """Time-ordered ids, as notifyd makes them (new rows land at the primary key's right
    edge; random ids would measure a different index)."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def __call__(self) -> uuid.UUID:
        ms = time.time_ns() // 1_000_000
        value = (ms << 80) | (0x7 << 76) | ((next(self._seq) & 0xFFF) << 64)
        value |= (0b10 << 62) | int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        return uuid.UUID(int=value)


async def _rows_phase(
    workers: int,
    rows: int,
    seconds: float,
    step: int,
    write: Callable[[int], Awaitable[None]],
) -> tuple[int, float]:
    """`write(worker)` of `step` rows each, on `workers` workers, until `rows` or `seconds`;
    returns (rows written, seconds)."""
    counter = itertools.count()
    written = 0
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        nonlocal written
        while time.monotonic() < deadline and next(counter) * step < rows:
            await write(n)
            written += step

    began = time.monotonic()
    await all_or_none(worker(n) for n in range(workers))
    return written, max(1e-9, time.monotonic() - began)


async def _pg_xadd(o: LimitsOptions, run_id: str) -> dict[str, Any]:
    table = f"bench_limits_{run_id}"
    stream = f"bench:limits:{run_id}"
    tenant = f"bench-{run_id}"
    new_id = _Uuid7()
    conns = [await asyncpg.connect(o.database_url) for _ in range(o.pg_concurrency)]
    redis = Redis.from_url(o.redis_url, max_connections=o.pg_concurrency + 2)
    batch_sql = INSERT_BATCH.format(table=table)
    one_sql = INSERT_ONE.format(table=table)
    made = itertools.count()

    def row() -> tuple[Any, ...]:
        n = next(made)
        user = f"bench-{run_id}-u{n % 1000}"
        return (new_id(), tenant, "bench-service", user, "in_app", user, f"bench {n}", None)

    async def batch(worker: int) -> None:
        rows = [row() for _ in range(BATCH)]
        await conns[worker].execute(
            batch_sql, *(list(column) for column in zip(*rows, strict=True))
        )
        pipe = redis.pipeline(transaction=False)
        for r in rows:
            pipe.xadd(
                stream,
                {"v": "1", "tenant": tenant, "id": str(r[0])},
                maxlen=STREAM_MAX_LEN,
                approximate=True,
            )
        await pipe.execute()

    async def single(worker: int) -> None:
        r = row()
        await conns[worker].execute(one_sql, *r)
        await redis.xadd(
            stream,
            {"v": "1", "tenant": tenant, "id": str(r[0])},
            maxlen=STREAM_MAX_LEN,
            approximate=True,
        )

    try:
        await conns[0].execute(SCRATCH_TABLE.format(table=table))
        batched, batched_s = await _rows_phase(
            o.pg_concurrency, o.pg_rows, o.pg_seconds, BATCH, batch
        )
        singles, singles_s = await _rows_phase(o.pg_concurrency, o.pg_rows, o.pg_seconds, 1, single)
        in_table = int(await conns[0].fetchval(f"SELECT count(*) FROM {table}"))
        in_stream = int(await redis.xlen(stream))
        versions = {
            "postgresql": await postgres_version(conns[0]),
            "redis": await redis_version(o.redis_url),
        }
    finally:
        try:
            await conns[0].execute(f"DROP TABLE IF EXISTS {table}")
            await redis.delete(stream)
        finally:
            await redis.aclose()
            for conn in conns:
                await conn.close()
    return {
        "pg_xadd_rows_per_s": round(batched / batched_s, 1),
        "pg_xadd_rows_per_s_single": round(singles / singles_s, 1),
        "batch": BATCH,
        "concurrency": o.pg_concurrency,
        "rows_batched": batched,
        "rows_single": singles,
        "rows_in_table": in_table,
        "entries_in_stream": in_stream,
        "versions": versions,
    }


def _message(token: str, i: int) -> EmailMessage:
    """Shaped like notifyd's (providers/smtp.py): the same headers, a short text body."""
    message = EmailMessage()
    message["From"] = "notifyd@localhost"
    message["To"] = f"bench-{i % 1000}@example.test"
    message["Subject"] = f"[bench:{token}] benchmark"
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain="localhost")
    message["X-Notifyd-Id"] = str(uuid.uuid4())
    message.set_content(f"Benchmark email {token}.")
    return message


async def _smtp(o: LimitsOptions, run_id: str) -> dict[str, Any]:
    mail = MailLog()
    tokens = [f"lim.{run_id}-{i}" for i in range(o.smtp_count)]
    mail.expect(set(tokens))
    counter = itertools.count()
    errors = 0
    async with BareServer("smtp", on_line=mail.on_line) as sink:
        clients = [
            aiosmtplib.SMTP(
                hostname="127.0.0.1", port=sink.port, start_tls=False, timeout=SMTP_TIMEOUT_S
            )
            for _ in range(o.smtp_connections)
        ]
        await all_or_none(client.connect() for client in clients)

        async def worker(client: aiosmtplib.SMTP) -> None:
            nonlocal errors
            while (i := next(counter)) < o.smtp_count:
                try:
                    await client.send_message(_message(tokens[i], i))
                except aiosmtplib.SMTPException:
                    errors += 1

        try:
            began = time.monotonic_ns()
            await all_or_none(worker(c) for c in clients)
            await mail.wait(time.monotonic() + o.smtp_margin)
        finally:
            for client in clients:
                if client.is_connected:
                    await client.quit()
    firsts = [f for t in tokens if (f := mail.first(t)) is not None]
    span_s = max(1e-9, (max(firsts) - began) / 1e9) if firsts else None
    return {
        "smtp_per_s": round(len(firsts) / span_s, 1) if span_s else 0.0,
        "count": o.smtp_count,
        "connections": o.smtp_connections,
        "arrived": len(firsts),
        "missing": o.smtp_count - len(firsts),
        "duplicates": mail.duplicates(f"lim.{run_id}-"),
        "errors": errors,
    }


async def main(options: LimitsOptions) -> dict[str, Any]:
    """Measure every ceiling in turn; returns the result (one JSON line)."""
    o = options
    if not o.database_url or not o.redis_url:
        raise BenchError("--database-url and --redis-url (or DATABASE_URL, REDIS_URL) are needed")
    if min(o.pg_rows, o.pg_concurrency, o.smtp_count, o.smtp_connections) < 1:
        raise BenchError("--pg-rows, --pg-concurrency, --smtp-count, --smtp-connections: ≥ 1")
    require_loopback_url(o.database_url, "--database-url")
    require_loopback_url(o.redis_url, "--redis-url")
    say = (lambda _m: None) if o.quiet else log
    run_id = secrets.token_hex(4)
    secret = o.jwt_secret if len(o.jwt_secret) >= 16 else UNVERIFIED_SECRET
    minter = TokenMinter(secret)
    say(f"http: bare aiohttp, {o.http_connections} connections for {o.http_duration:.0f} s")
    http = await _http(o, minter, run_id)
    say(f"ws: bare fan-out, {o.ws_rooms} rooms x {o.ws_members} members")
    ws = await _ws(o, secret, minter.user_claim)
    say(f"pg+xadd: batches of {BATCH}, then one row per round trip")
    pg = await _pg_xadd(o, run_id)
    say(f"smtp: {o.smtp_count} messages over {o.smtp_connections} connections")
    smtp = await _smtp(o, run_id)
    versions = pg.pop("versions")
    return {
        "workload": "limits",
        "http_req_per_s": http["req_per_s"],
        "ws_delivered_per_s": ws["delivered_per_s"],
        "pg_xadd_rows_per_s": pg["pg_xadd_rows_per_s"],
        "pg_xadd_rows_per_s_single": pg["pg_xadd_rows_per_s_single"],
        "smtp_per_s": smtp["smtp_per_s"],
        "http": http,
        "ws": ws,
        "pg_xadd": pg,
        "smtp": smtp,
        "machine": {**machine(), **versions},
    }


__all__ = ["LimitsOptions", "add_arguments", "main", "options_from"]
