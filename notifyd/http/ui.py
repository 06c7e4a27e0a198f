"""`/ui/…`: the web components' ES modules, and the demo page when DEBUG is on.

A module is cacheable and versioned: its ETag is its content hash, and a URL carrying that
hash (`/ui/notifyd-inbox.js?v=<version>`, the form the demo page and README use) may be kept
for a year, since another version has another URL. Without `?v=` (or with a stale one) the
browser revalidates each time (`no-cache`) and gets a 304 while nothing changed. The files
are public (no token): they hold no data, only code. CORS for host pages on other origins is
`middleware.cors_middleware`'s job, like every other route's.
"""

from __future__ import annotations

import html
from typing import Any

from aiohttp import web

from notifyd.auth.tokens import mint_token
from notifyd.http.context import services
from notifyd.http.problems import Problem
from notifyd.ui import COMPONENTS, DEMO_PAGE, asset

IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"
# the demo's tokens: a tenant of its own, long enough to play with it for an afternoon
DEMO_TENANT = "demo"
DEMO_USERS = ("alice", "bob")
DEMO_TOKEN_TTL = 8 * 3600


def versioned_url(name: str) -> str:
    """The URL a page should load component `name` from: cacheable for ever."""
    return f"/ui/{name}?v={asset(name).version}"


async def component(request: web.Request) -> web.StreamResponse:
    name = request.path.rsplit("/", 1)[-1]
    served = asset(name)
    cache = IMMUTABLE if request.query.get("v") == served.version else REVALIDATE
    # the same URL answers with or without CORS headers, by Origin: caches must keep both
    headers = {"ETag": served.etag, "Cache-Control": cache, "Vary": "Origin"}
    if served.etag in _etags(request.headers.get("If-None-Match", "")):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=served.body,
        content_type="text/javascript",
        charset="utf-8",
        headers=headers,
    )


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


async def demo(request: web.Request) -> web.Response:
    """Two users' inboxes and a chat between them, with tokens minted here: only with DEBUG
    on (a token for anyone who asks is a development convenience, never a production one)."""
    settings = services(request).settings
    if not settings.debug:
        raise Problem(404, "the demo page is served only when DEBUG is on", kind="not-found")
    if not settings.jwt_secret:
        raise Problem(
            404,
            "the demo page signs its tokens with JWT_SECRET, which is not set",
            kind="not-found",
        )
    page = asset(DEMO_PAGE).body.decode()
    values = {
        "{{INBOX_URL}}": versioned_url("notifyd-inbox.js"),
        "{{CHAT_URL}}": versioned_url("notifyd-chat.js"),
        "{{TENANT}}": DEMO_TENANT,
    }
    for user in DEMO_USERS:
        token = mint_token(settings, tenant_id=DEMO_TENANT, user_id=user, ttl=DEMO_TOKEN_TTL)
        values[f"{{{{TOKEN_{user.upper()}}}}}"] = token
    for key, value in values.items():
        page = page.replace(key, html.escape(value))
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def openapi_paths() -> dict[str, dict[str, Any]]:
    """These routes in /openapi.json (merged by `notifyd.http.openapi`)."""
    problem = {"application/problem+json": {"schema": {"type": "object"}}}
    paths: dict[str, dict[str, Any]] = {}
    for name in COMPONENTS:
        paths[f"/ui/{name}"] = {
            "get": {
                "summary": f"The <{name.removesuffix('.js')}> web component (an ES module). "
                "ETag is its version; with ?v=<version> it is cacheable for a year. CORS for "
                "NOTIFYD_ALLOWED_ORIGINS.",
                "security": [],
                "parameters": [{"name": "v", "in": "query", "schema": {"type": "string"}}],
                "responses": {
                    "200": {
                        "description": "The module",
                        "content": {"text/javascript": {"schema": {"type": "string"}}},
                    },
                    "304": {"description": "Not modified (If-None-Match)"},
                },
            }
        }
    paths["/ui/demo"] = {
        "get": {
            "summary": "A demo page: two users' inboxes and a chat (only when DEBUG is on)",
            "security": [],
            "responses": {
                "200": {
                    "description": "The page",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                "404": {"description": "DEBUG is off", "content": problem},
            },
        }
    }
    return paths


def add_routes(app: web.Application) -> None:
    for name in COMPONENTS:
        app.router.add_get(f"/ui/{name}", component)
    app.router.add_get("/ui/demo", demo)
