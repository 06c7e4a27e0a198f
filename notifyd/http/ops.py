"""Operations endpoints: liveness, readiness and metrics. No token needed."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from notifyd.http.context import services
from notifyd.http.responses import json_response

READY_CHECK_TIMEOUT_S = 2.0


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about dependencies, on purpose."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: PostgreSQL and Redis answer and every actor is running."""
    ctx = services(request)
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await ctx.pool.fetchval("SELECT 1")
        checks["postgresql"] = "ok"
    except Exception as exc:  # whatever the failure, the answer is the same: not ready
        checks["postgresql"] = f"failing: {type(exc).__name__}"
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT_S):
            await ctx.redis.ping()
        checks["redis"] = "ok"
    except (RedisError, OSError, TimeoutError) as exc:
        checks["redis"] = f"failing: {type(exc).__name__}"
    actors = ctx.actors_status()
    checks["actors"] = "ok" if ctx.actors_healthy() else "failing"
    ready = all(value == "ok" for value in checks.values())
    return json_response(
        {"status": "ready" if ready else "not ready", "checks": checks, "actors": actors},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    body = services(request).metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
