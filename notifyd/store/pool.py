"""The asyncpg pool: JSON codecs once per connection, a deadline on every checkout, and a
close that cannot hang shutdown."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import asyncpg
import orjson
from asyncpg.pool import PoolAcquireContext, PoolConnectionProxy

from notifyd.payloads import json_default
from notifyd.settings import Settings

log = logging.getLogger("notifyd.store")

Pool = asyncpg.Pool
# A connection as handlers see it (from a pool) or as the CLI opens it (alone).
Conn = asyncpg.Connection | PoolConnectionProxy
# Anything a read can run on: a pool checks a connection out for one statement.
Executor = asyncpg.Pool | Conn


# The queue's connections plan every execution for the table as it is now. PostgreSQL
# otherwise settles on a generic plan after five runs of a prepared statement and keeps it
# until the next ANALYZE; one made on a fresh or purged table (a deploy, then a burst)
# seq-scans the queue while it grows to hundreds of thousands of rows, and autovacuum may not
# look for a minute; PostgreSQL's CPU per notification then varied with when each plan was
# cached, and planning every time made it low and steady (docs/benchmarks.md). Planning costs
# little per row at a loaded dispatcher's batch sizes, but a whole statement's worth on a
# single-row read: the API's pool keeps cached plans (a notification center page is cheaper
# for PostgreSQL with them).
QUEUE_SETTINGS = {"plan_cache_mode": "force_custom_plan"}

# The keyed pool's connections: the dispatcher's batches and the in-app delivery's, whose
# statements find each row by its key from arrays of keys (`unnest($1, $2) JOIN
# notifications ON (tenant_id, id)`). Under QUEUE_SETTINGS each execution of them is planned
# again, 150-330 µs a statement, as much as PostgreSQL's execution of a batch of a dozen rows
# (docs/benchmarks.md). Here each connection plans such a statement once and keeps the plan,
# and that plan can only be the one right at any table size, index lookups in a nested loop:
# sequential scans and hash and merge joins are priced out, so a plan made on an empty queue
# (QUEUE_SETTINGS' reason) is still the index plan. Only statements that find every row by
# an index belong on this pool (tests/test_keyed_plans.py checks each one's plan).
KEYED_SETTINGS = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            encoder=lambda value: orjson.dumps(value, default=json_default).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset (four statements, one more round trip
    per checkout). notifyd never changes session state on pooled connections (no SET, no
    LISTEN; the migration's advisory lock lives on its own connection, and the housekeeper
    releases its retention lock before its connection goes back, or closes it), and an open
    transaction is still rolled back by asyncpg before this is called."""
    return None


class DeadlinePool(asyncpg.Pool):
    """asyncpg's pool, with a deadline on every checkout that names none.

    asyncpg waits for a free connection forever unless `acquire(timeout=…)` says otherwise,
    and its own `fetch`, `fetchval`, `execute`… acquire without one. When PostgreSQL hangs,
    every connection stays checked out by a statement waiting for
    `NOTIFYD_DB_COMMAND_TIMEOUT`, and the callers queued behind them would wait with no
    bound at all. Here each of those waits ends after `acquire_timeout` seconds with
    `TimeoutError` (a request's 503, an actor's crash and restart). asyncpg applies the same
    timeout to the release, including waiting out the cancellation of a statement that
    timed out, so giving the connection back is bounded too."""

    __slots__ = ("_acquire_timeout",)

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> PoolAcquireContext[asyncpg.Record]:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)

    async def _acquire(self, timeout: float | None) -> Any:  # noqa: ASYNC109 (asyncpg's signature)
        """asyncpg's checkout, bounded by `asyncio.timeout` instead of asyncpg's own
        `wait_for`, which starts a task for every checkout (measured: most of what the
        deadline cost a REST send); the same bound, one timer handle. The release keeps
        the bound too, as asyncpg's own path records it on the connection's holder."""
        checkout = super()._acquire  # type: ignore[misc]  # private in asyncpg's stubs
        if timeout is None:
            return await checkout(None)
        async with asyncio.timeout(timeout):
            proxy = await checkout(None)
        proxy._holder._timeout = timeout
        return proxy


async def create_pool(
    settings: Settings,
    *,
    connect_timeout: float = 30.0,
    queue: bool = False,
    keyed: bool = False,
) -> asyncpg.Pool:
    """Open a pool, retrying while PostgreSQL is still starting (boot order on a VM).

    `queue`: the pool of the actors that move rows through the queue tables (dispatcher,
    senders, reminders, sweeper, housekeeper), whose batches must be planned for the table as
    it is (`QUEUE_SETTINGS`); `keyed`: the dispatcher's statements that find their rows by
    key (`KEYED_SETTINGS`, at most NOTIFYD_DB_KEYED_POOL_MAX connections); the API's pool is
    the third."""
    server_settings = KEYED_SETTINGS if keyed else QUEUE_SETTINGS if queue else {}
    max_size = settings.db_keyed_pool_max if keyed else settings.db_pool_max
    deadline = asyncio.get_running_loop().time() + connect_timeout
    delay = 0.2
    while True:
        try:
            # what asyncpg.create_pool does, with our class (it takes no pool class)
            pool = await DeadlinePool(
                settings.database_url,
                acquire_timeout=settings.db_acquire_timeout,
                min_size=min(settings.db_pool_min, max_size),
                max_size=max_size,
                max_queries=50_000,
                max_inactive_connection_lifetime=300.0,
                command_timeout=settings.db_command_timeout,
                init=_init_connection,
                reset=_keep_session,
                server_settings=dict(server_settings),
                loop=asyncio.get_running_loop(),
                connection_class=asyncpg.Connection,
                record_class=asyncpg.Record,
            )
        except (OSError, asyncpg.CannotConnectNowError) as exc:
            if asyncio.get_running_loop().time() + delay > deadline:
                raise
            log.warning("postgresql not reachable yet, retrying", extra={"error": str(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        else:
            assert pool is not None
            return pool


async def close_pool(pool: asyncpg.Pool, grace: float = 5.0) -> None:
    """Graceful close, else terminate: whatever happens, including cancellation."""
    try:
        await asyncio.wait_for(pool.close(), grace)
    except BaseException:
        pool.terminate()
        raise
