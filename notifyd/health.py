"""Do PostgreSQL and Redis answer, within a deadline? One check for `/readyz` and the watchdog.

A dependency that refuses connections makes its callers fail fast; one that hangs (a paused
VM, a half-open TCP connection, a server stuck on a full disk) makes them wait, and an
instance whose every request waits is wedged even though all its actors are "running". Both
`/readyz` and the systemd watchdog ask the same question, the same way: each check gets the
same short deadline (`NOTIFYD_READY_TIMEOUT`), and both run at once, so the answer takes at
most one deadline whatever hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import asyncpg
from redis.asyncio import Redis

OK = "ok"


async def _check(probe: Awaitable[object], deadline: float) -> str:
    try:
        async with asyncio.timeout(deadline):
            await probe
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # whatever the failure, the answer is the same: not answering
        return f"failing: {type(exc).__name__}"
    return OK


async def check_dependencies(pool: asyncpg.Pool, redis: Redis, deadline: float) -> dict[str, str]:
    """`{"postgresql": "ok" | "failing: <error>", "redis": …}`, in at most `deadline` s."""
    postgresql, redis_state = await asyncio.gather(
        _check(pool.fetchval("SELECT 1"), deadline),
        _check(redis.ping(), deadline),
    )
    return {"postgresql": postgresql, "redis": redis_state}


def all_ok(checks: dict[str, str]) -> bool:
    return all(state == OK for state in checks.values())
