"""The caller's own notification preferences: opt out of a channel or a category.

Any role may read and replace its own preferences, and only its own: the user comes from the
token. PUT replaces the whole document (a channel or category left out is opted back in), so
what a client sends is exactly what is stored.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from notifyd.http.context import audit_entry, identity, services
from notifyd.http.responses import json_response
from notifyd.http.validation import Fields, read_json_object
from notifyd.preferences import Preferences
from notifyd.settings import CHANNELS
from notifyd.store import audit
from notifyd.store import preferences as store

CATEGORY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_CATEGORIES = 100


def preferences_json(prefs: Preferences | None) -> dict[str, Any]:
    if prefs is None:
        return {"channels": {}, "categories": {}}
    return {"channels": dict(prefs.channels), "categories": dict(prefs.categories)}


def _flags(
    fields: Fields, name: str, value: dict[str, Any], allowed: re.Pattern[str] | None
) -> dict[str, bool]:
    flags: dict[str, bool] = {}
    for key, flag in value.items():
        if allowed is None and key not in CHANNELS:
            fields.error(f"{name}.{key}", f"is not a channel (channels: {', '.join(CHANNELS)})")
        elif allowed is not None and not allowed.fullmatch(key):
            fields.error(
                f"{name}.{key[:64]}", "a category name is 1-64 letters, digits and _ . : -"
            )
        elif not isinstance(flag, bool):
            fields.error(f"{name}.{key}", "must be true or false")
        else:
            flags[key] = flag
    return flags


async def get_preferences(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    prefs = await store.load(ctx.pool, caller.tenant_id, caller.user_id)
    return json_response(preferences_json(prefs))


async def put_preferences(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    fields = Fields(await read_json_object(request), ctx.id_rule)
    channels = fields.mapping("channels", max_keys=MAX_CATEGORIES)
    categories = fields.mapping("categories", max_keys=MAX_CATEGORIES)
    prefs = Preferences(
        channels=_flags(fields, "channels", channels or {}, None),
        categories=_flags(fields, "categories", categories or {}, CATEGORY),
    )
    fields.done()
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
