"""The tenant's audit log, readable by its admins."""

from __future__ import annotations

from aiohttp import web

from notifyd.auth import policy
from notifyd.http.context import identity, services
from notifyd.http.problems import forbidden
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_query, schemas
from notifyd.store import audit as store


async def list_audit(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    if not policy.may_read_audit(caller):
        raise forbidden("only admins may read the audit log")
    query = read_query(request, schemas(request).audit_query)
    limit, before, action, user_id = query.limit, query.before, query.action, query.user_id
    rows = await store.list_entries(
        ctx.pool, caller.tenant_id, before=before, action=action, user_id=user_id, limit=limit + 1
    )
    rows, headers = page(request, rows, limit)
    body = [
        {
            "id": str(r["id"]),
            "user_id": r["user_id"],
            "action": r["action"],
            "ip_address": r["ip_address"],
            "request_id": r["request_id"],
            "details": r["details"],
            "timestamp": iso(r["created_at"]),
        }
        for r in rows
    ]
    return json_response(body, headers=headers)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/audit/", list_audit)
    app.router.add_get("/api/audit/", list_audit)
