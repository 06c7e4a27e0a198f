"""Recipients: where a workflow's steps reach a user, in which zone and language.

A service or admin stores a user's addresses (`PUT /recipients/{user_id}/`, the whole
recipient), reads and deletes them; a user reads their own and changes only its time zone
and locale (`/recipients/me/`: the user comes from the token, never from the path). Values
follow the contact rule (`schemas.contacts`); the phone is stored in E.164, read in the
tenant's region (a number that is not one there: 422 unsendable). Every change is audited.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from notifyd.auth import policy
from notifyd.http.context import audit_entry, identity, services, tenant_settings_of
from notifyd.http.problems import FieldError, forbidden, invalid, not_found, unsendable
from notifyd.http.responses import iso, json_response
from notifyd.http.validation import read_model, schemas
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.store import audit
from notifyd.store import recipients as store
from notifyd.store.tenants import region_for

ME = "me"
"""The path segment that means the caller: `/recipients/me/` (no user id `me` is reachable
through `/recipients/{user_id}/`)."""


def recipient_json(row: asyncpg.Record) -> dict[str, Any]:
    """The answer's shape (`schemas.recipients.Recipient`)."""
    return {
        "user_id": row["user_id"],
        **{name: row[name] for name in store.FIELDS},
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def _user_id(request: web.Request) -> str:
    """The path's user id, checked by the id rule (422 naming `user_id`)."""
    user_id = request.match_info["user_id"]
    problem = services(request).id_rule.problem(user_id)
    if user_id == ME:
        problem = "me names the caller: GET or PATCH /recipients/me/"
    if problem is not None:
        raise invalid([FieldError("user_id", problem)])
    return user_id


def _may_manage(request: web.Request) -> None:
    caller = identity(request)
    if not policy.may_manage_recipients(caller):
        raise forbidden(
            f"role {caller.role!r} may not manage recipients; a user changes their own "
            "timezone and locale at /recipients/me/"
        )


async def put_recipient(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    user_id = _user_id(request)
    body = await read_model(request, schemas(request).recipient_put)
    _may_manage(request)
    values: dict[str, str | None] = {name: getattr(body, name) for name in store.FIELDS}
    if body.phone is not None:
        region = region_for(await tenant_settings_of(ctx, caller.tenant_id), ctx.settings)
        try:
            values["phone"] = to_e164(body.phone, region)
        except InvalidPhone as exc:  # the tenant's region is state: not the body's shape
            raise unsendable([FieldError("phone", str(exc))]) from None
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.put(conn, caller.tenant_id, user_id, values)
        await audit.record(
            conn,
            audit_entry(
                request,
                "recipient.put",
                # which values are set, not the addresses themselves
                {"user_id": user_id, "set": sorted(k for k, v in values.items() if v)},
            ),
        )
    return json_response(recipient_json(row))


async def _stored(request: web.Request, user_id: str) -> web.Response:
    """The recipient's stored contact in the caller's tenant, or 404."""
    row = await store.get(services(request).pool, identity(request).tenant_id, user_id)
    if row is None:
        raise not_found("recipient")
    return json_response(recipient_json(row))


async def get_recipient(request: web.Request) -> web.Response:
    user_id = _user_id(request)
    _may_manage(request)
    return await _stored(request, user_id)


async def delete_recipient(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    user_id = _user_id(request)
    _may_manage(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.delete(conn, caller.tenant_id, user_id):
            raise not_found("recipient")
        await audit.record(conn, audit_entry(request, "recipient.delete", {"user_id": user_id}))
    return web.Response(status=204)


async def get_own(request: web.Request) -> web.Response:
    return await _stored(request, identity(request).user_id)


async def patch_own(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    body = await read_model(request, schemas(request).recipient_patch)
    values = {name: getattr(body, name) for name in body.model_fields_set}
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.patch_own(conn, caller.tenant_id, caller.user_id, values)
        await audit.record(
            conn, audit_entry(request, "recipient.patch", {"user_id": caller.user_id, **values})
        )
    return json_response(recipient_json(row))


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        # `me` first: a static resource, matched before the `{user_id}` one
        app.router.add_get(f"{prefix}/recipients/{ME}/", get_own)
        app.router.add_patch(f"{prefix}/recipients/{ME}/", patch_own)
        app.router.add_put(f"{prefix}/recipients/{{user_id}}/", put_recipient)
        app.router.add_get(f"{prefix}/recipients/{{user_id}}/", get_recipient)
        app.router.add_delete(f"{prefix}/recipients/{{user_id}}/", delete_recipient)
