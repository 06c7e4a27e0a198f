"""`redis_footprint`: what N made-up recipients cost in Redis, and what is left once their
history streams expired.

With a service token of a tenant of this run only, the harness sends one in-app
notification of `--size` bytes to each of `--ids` made-up user ids (`--concurrency`
requests at once), waits until every one is recorded on its user's history stream, and
reads Redis: `INFO memory` `used_memory` and `DBSIZE` against their values before the run,
`MEMORY USAGE` of every history stream of the run (`SCAN` on the tenant's prefix) and the
expiry left on them (`PTTL`). Without an expiry (as before issue 24) that footprint stays
forever. With `--expiry-wait S` the harness then waits up to S seconds for the streams to
expire (start the daemon with a short `NOTIFYD_WS_HISTORY_TTL` to see it) and reads the
same figures again.

Figures: `streams`, `keys_added`, `used_memory_added` (bytes), `stream_bytes` (sum of
`MEMORY USAGE`), `per_stream_bytes`, `ttl_s` (min and max of the streams' expiry), and
`after_expiry` (`streams_left`, `keys_added`, `used_memory_added`, `waited_s`) when waited.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    require_loopback_url,
    service_token,
)


@dataclass(slots=True)
class FootprintOptions:
    url: str = DEFAULT_URL
    redis_url: str = ""
    jwt_secret: str = ""
    prefix: str = "notifyd"
    ids: int = 10_000
    size: int = 2048
    concurrency: int = 32
    expiry_wait: float = 0.0
    record_bound: float = 120.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--redis-url", "notifyd's Redis")
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET")
    parser.add_argument("--prefix", default="notifyd", help="the daemon's NOTIFYD_REDIS_PREFIX")
    parser.add_argument("--ids", type=int, default=10_000, help="made-up recipients")
    parser.add_argument("--size", type=int, default=2048, help="bytes of each message")
    parser.add_argument("--concurrency", type=int, default=32, help="requests at once")
    parser.add_argument(
        "--expiry-wait",
        type=float,
        default=0.0,
        help="then wait up to S seconds for the streams to expire (0: do not wait)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def options_from(args: argparse.Namespace) -> FootprintOptions:
    return options_of(FootprintOptions, args)


async def _send_all(o: FootprintOptions, tenant: str, recipients: list[str]) -> int:
    """Posts one notification to each recipient; the number answered 202."""
    token = service_token(o.jwt_secret, tenant_id=tenant, user_id="bench-fp", ttl=3600)
    headers = {"Authorization": f"Bearer {token}"}
    message = "x" * o.size
    todo = iter(recipients)
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        for recipient in todo:
            body = {"notification_type": "in_app", "recipient": recipient, "message": message}
            async with session.post(
                o.url.rstrip("/") + "/notifications/send/", json=body, headers=headers
            ) as response:
                await response.read()
                if response.status != 202:
                    raise BenchError(f"POST /notifications/send/ answered {response.status}")
                accepted += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(o.concurrency)))
    return accepted


async def _streams(redis: Redis, pattern: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=pattern, count=1000)]


async def _used(redis: Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


async def main(options: FootprintOptions) -> dict[str, Any]:
    o = options
    require_loopback_url(o.url, "--url")
    if not o.redis_url:
        raise BenchError("--redis-url (or $REDIS_URL) is needed to read Redis")
    require_loopback_url(o.redis_url, "--redis-url")
    if o.ids < 1 or o.size < 1:
        raise BenchError("--ids and --size must be positive")
    tenant = f"bench-fp-{secrets.token_hex(4)}"
    recipients = [f"made-up-{n}" for n in range(o.ids)]
    # notifyd.keys.Keys.user_history: <prefix>:history:<len(tenant)>:<tenant>:<user>
    pattern = f"{o.prefix}:history:{len(tenant)}:{tenant}:*"
    redis = Redis.from_url(o.redis_url)
    try:
        used_before, keys_before = await _used(redis), int(await redis.dbsize())
        started = time.perf_counter()
        accepted = await _send_all(o, tenant, recipients)
        if not o.quiet:
            log(f"{accepted} accepted in {time.perf_counter() - started:.1f} s; waiting")
        deadline = time.monotonic() + o.record_bound
        while len(streams := await _streams(redis, pattern)) < o.ids:
            if time.monotonic() > deadline:
                raise BenchError(f"only {len(streams)} of {o.ids} streams recorded in time")
            await asyncio.sleep(0.5)
        pipe = redis.pipeline(transaction=False)
        for key in streams:
            pipe.memory_usage(key, samples=0)
            pipe.pttl(key)
        replies = await pipe.execute()
        sizes, ttls = replies[0::2], replies[1::2]
        result: dict[str, Any] = {
            "workload": "redis_footprint",
            "ids": o.ids,
            "message_bytes": o.size,
            "accepted": accepted,
            "streams": len(streams),
            "keys_added": int(await redis.dbsize()) - keys_before,
            "used_memory_added": await _used(redis) - used_before,
            "stream_bytes": sum(sizes),
            "per_stream_bytes": round(sum(sizes) / len(sizes)),
            "ttl_s": {"min": round(min(ttls) / 1000, 1), "max": round(max(ttls) / 1000, 1)},
        }
        if o.expiry_wait > 0:
            waited = time.monotonic()
            while True:  # Redis expires keys on its own clock: nothing to wait on but a poll
                left = len(await _streams(redis, pattern))
                if not left or time.monotonic() - waited >= o.expiry_wait:
                    break
                await asyncio.sleep(1.0)
            result["after_expiry"] = {
                "streams_left": left,
                "keys_added": int(await redis.dbsize()) - keys_before,
                "used_memory_added": await _used(redis) - used_before,
                "waited_s": round(time.monotonic() - waited, 1),
            }
    finally:
        await redis.aclose()
    return {**result, "run": {"tenant": tenant, "url": o.url}, "machine": machine()}


__all__ = ["FootprintOptions", "add_arguments", "main", "options_from"]
