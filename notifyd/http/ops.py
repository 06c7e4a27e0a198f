"""Operations endpoints: liveness, readiness and metrics. No token needed."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from notifyd.health import all_ok, check_dependencies
from notifyd.http.context import services
from notifyd.http.responses import json_response


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers. Says nothing about dependencies, on purpose."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: PostgreSQL and Redis answer (each within NOTIFYD_READY_TIMEOUT, checked at
    once: a hung one answers 503 after that deadline, not never) and every actor is running."""
    ctx = services(request)
    checks = await check_dependencies(ctx.pool, ctx.redis, ctx.settings.ready_timeout)
    actors = ctx.actors_status()
    checks["actors"] = "ok" if ctx.actors_healthy() else "failing"
    ready = all_ok(checks)
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
