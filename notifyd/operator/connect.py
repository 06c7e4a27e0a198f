"""Opening PostgreSQL and Redis for one operator command, with errors an operator can act on.

A command run by hand, or by a health script, must say in one line which server it could not
reach and exit non-zero, never print a traceback or wait a minute for a dead host.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from notifyd.settings import Settings
from notifyd.store.pool import close_pool, create_pool

# Exit codes every operator command shares (argparse already uses 2 for bad usage).
OK = 0
FAILED = 1  # a server unreachable or failing, or not everything asked for could be done
REFUSED = 2  # bad input: nothing was changed

_CONNECT_TIMEOUT = 5.0


class Unreachable(Exception):
    """PostgreSQL or Redis could not be reached; the message names the setting to check."""


@asynccontextmanager
async def postgres(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A two-connection pool (a command needs no more), with the daemon's codecs."""
    small = replace(settings, db_pool_min=1, db_pool_max=2)
    bound = 2 * _CONNECT_TIMEOUT
    try:
        # connect_timeout=0: no retry loop; a command should fail at once, not wait for boot.
        # The outer bound covers a host that drops packets (asyncpg would wait 60 s).
        async with asyncio.timeout(bound):
            pool = await create_pool(small, connect_timeout=0)
    except TimeoutError:
        raise Unreachable(
            f"cannot connect to PostgreSQL (DATABASE_URL): no answer within {bound:g} s"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise Unreachable(f"cannot connect to PostgreSQL (DATABASE_URL): {exc}") from None
    try:
        yield pool
    finally:
        await close_pool(pool)


@asynccontextmanager
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(
        settings.effective_redis_url,
        socket_connect_timeout=_CONNECT_TIMEOUT,
        socket_timeout=max(_CONNECT_TIMEOUT, settings.db_command_timeout),
    )
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise Unreachable(f"cannot reach Redis (REDIS_URL/REDIS_HOST): {exc}") from None
        yield client
    finally:
        await client.aclose()


async def guarded(command: str, work: Coroutine[Any, Any, int]) -> int:
    """Run one command; a server that is unreachable or fails midway is one line on stderr
    and exit code 1 (what was committed before the failure stays committed)."""
    try:
        return await work
    except Unreachable as exc:
        print(f"notifyd {command}: {exc}", file=sys.stderr)
    except RedisError as exc:
        print(f"notifyd {command}: Redis failed: {exc}", file=sys.stderr)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"notifyd {command}: PostgreSQL failed: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"notifyd {command}: a connection failed: {exc}", file=sys.stderr)
    return FAILED
