"""The caller's own notification preferences: opt out of a channel or a category.

Any role may read and replace its own preferences, and only its own: the user comes from the
token. PUT replaces the whole document (a channel or category left out is opted back in), so
what a client sends is exactly what is stored.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from notifyd.http.context import audit_entry, identity, services
from notifyd.http.responses import json_response
from notifyd.http.validation import read_model, schemas
from notifyd.preferences import Preferences
from notifyd.store import audit
from notifyd.store import preferences as store


def preferences_json(prefs: Preferences | None) -> dict[str, Any]:
    if prefs is None:
        return {"channels": {}, "categories": {}}
    return {"channels": dict(prefs.channels), "categories": dict(prefs.categories)}


async def get_preferences(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    prefs = await store.load(ctx.pool, caller.tenant_id, caller.user_id)
    return json_response(preferences_json(prefs))


async def put_preferences(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    body = await read_model(request, schemas(request).preferences)
    channels: dict[str, bool] = dict((body.channels or {}).items())
    prefs = Preferences(channels=channels, categories=dict(body.categories or {}))
    async with ctx.pool.acquire() as conn, conn.transaction():
        await store.save(conn, caller.tenant_id, caller.user_id, prefs)
        await audit.record(
            conn, audit_entry(request, "preferences.update", preferences_json(prefs))
        )
    return json_response(preferences_json(prefs))


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/preferences/", get_preferences)
        app.router.add_put(f"{prefix}/preferences/", put_preferences)
