"""A tenant's suppression list (issue 29), for its admins: `/suppressions/`.

- `GET /suppressions/`: the entries, newest first, paged like every list (`?limit=`,
  `?before=<id>`, the next page in `Link`).
- `DELETE /suppressions/{channel}/{address}/`: the address may be sent to again (every
  category's entry of it goes); 204, audited, or 404 when it is not on the list.

Entries are made by notifyd, never by a request: a relay's refusal of the mailbox, Twilio's
21610 or a STOP in its status callback, an unsubscribe. Another tenant's entries are never
shown nor removable: every statement is scoped by the token's tenant.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from notifyd.auth import policy
from notifyd.http.context import audit_entry, identity, services
from notifyd.http.problems import FieldError, forbidden, invalid, not_found
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_query, schemas
from notifyd.store import audit
from notifyd.store import suppressions as store
from notifyd.suppressions import ADDRESS_MAX, CHANNELS

BASE = "/suppressions/"


def suppression_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "channel": row["channel"],
        "address": row["address"],
        "category": row["category"] or None,
        "reason": row["reason"],
        "source": row["source"],
        "notification_id": None if row["notification_id"] is None else str(row["notification_id"]),
        "created_at": iso(row["created_at"]),
    }


def _require_admin(request: web.Request) -> None:
    if not policy.may_manage_suppressions(identity(request)):
        raise forbidden("only the tenant's admins may read or change its suppression list")


async def list_suppressions(request: web.Request) -> web.Response:
    _require_admin(request)
    query = read_query(request, schemas(request).page_query)
    rows = await store.page(
        services(request).pool, identity(request).tenant_id, query.before, query.limit + 1
    )
    rows, headers = page(request, rows, query.limit)
    return json_response([suppression_json(row) for row in rows], headers=headers)


async def delete_suppression(request: web.Request) -> web.Response:
    _require_admin(request)
    channel = request.match_info["channel"]
    address = request.match_info["address"]
    errors: list[FieldError] = []
    if channel not in CHANNELS:
        errors.append(FieldError("channel", f"must be one of {', '.join(CHANNELS)}"))
    if not address or len(address) > ADDRESS_MAX:
        errors.append(FieldError("address", f"must be 1 to {ADDRESS_MAX} characters"))
    if errors:
        raise invalid(errors)
    ctx = services(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        removed = await store.remove(conn, identity(request).tenant_id, channel, address)
        if not removed:
            raise not_found("suppressed address")
        await audit.record(
            conn,
            audit_entry(
                request,
                "suppression.delete",
                {
                    "channel": channel,
                    "address": removed[0]["address"],
                    "reasons": sorted({row["reason"] for row in removed}),
                },
            ),
        )
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        app.router.add_get(prefix + BASE, list_suppressions)
        app.router.add_delete(prefix + BASE + "{channel}/{address}/", delete_suppression)
