"""Interview reminders: create, list, reschedule, cancel.

Reschedule and cancel only touch a reminder still `scheduled` (a guarded UPDATE), so they
cannot race the timer into firing at the old time or firing a cancelled reminder.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from notifyd.auth import policy
from notifyd.http.context import (
    Services,
    audit_entry,
    identity,
    services,
    tenant_settings_of,
)
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_send_rate
from notifyd.http.problems import FieldError, Problem, forbidden, not_found, unsendable
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import parse_uuid, uuid7
from notifyd.providers.phones import InvalidPhone, to_e164
from notifyd.reminders import wheel_item
from notifyd.schemas.contacts import Contact
from notifyd.schemas.reminders import time_problems
from notifyd.store import audit
from notifyd.store import reminders as store
from notifyd.store.tenants import region_for

log = logging.getLogger("notifyd.http.reminders")


def reminder_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "application_id": row["application_id"],
        "candidate_id": row["candidate_id"],
        "employer_id": row["employer_id"],
        "created_by": row["created_by"],
        "interview_time": iso(row["interview_time"]),
        "reminder_time": iso(row["reminder_time"]),
        "status": row["status"],
        "is_sent": row["status"] == "fired",
        "fired_at": iso(row["fired_at"]),
        "late": row["late"],
        "lateness_ms": row["lateness_ms"],
        "candidate_contact": (row["details"] or {}).get("candidate_contact"),
        "employer_contact": (row["details"] or {}).get("employer_contact"),
        "channels": (row["details"] or {}).get("channels"),
        "notification_ids": [str(i) for i in row["notification_ids"]],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


async def _contact(
    ctx: Services, tenant_id: str, name: str, contact: Contact | None
) -> tuple[dict[str, str] | None, list[FieldError]]:
    """A contact as stored (its phone in E.164, read in the tenant's region), or why its phone
    is not a number there."""
    if contact is None:
        return None, []
    stored = contact.model_dump(exclude_none=True)
    if contact.phone is not None:
        region = region_for(await tenant_settings_of(ctx, tenant_id), ctx.settings)
        try:
            stored["phone"] = to_e164(contact.phone, region)
        except InvalidPhone as exc:
            return None, [FieldError(f"{name}.phone", str(exc))]
    return stored, []


async def _put_on_wheel(
    ctx: Services, tenant_id: str, reminder_id: uuid.UUID, due: datetime
) -> None:
    """After the commit: the row is the truth; if Redis fails here, the sweeper's rebuild and
    overdue check put the reminder on the wheel from PostgreSQL."""
    try:
        await ctx.schedule.add(wheel_item(ctx.keys, tenant_id, reminder_id), due)
    except RedisError as exc:
        log.warning(
            "reminder not put on the wheel; left for the sweeper", extra={"error": repr(exc)}
        )


async def create_reminder(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    await check_send_rate(request)
    body = await read_model(request, schemas(request).reminder_create)
    if not policy.may_manage_reminders(caller):
        raise forbidden(f"role {caller.role!r} may not create reminders; use a service token")
    candidate_contact, found = await _contact(
        ctx, caller.tenant_id, "candidate_contact", body.candidate_contact
    )
    employer_contact, also = await _contact(
        ctx, caller.tenant_id, "employer_contact", body.employer_contact
    )
    if found or also:
        raise unsendable(found + also)
    channels = None if body.channels is None else list(dict.fromkeys(body.channels))
    if channels is not None and "in_app" not in channels:
        channels.insert(0, "in_app")  # in-app always: the notification center is the record
    application_id, reminder_time = body.application_id, body.reminder_time
    row = store.NewReminder(
        id=uuid7(),
        tenant_id=caller.tenant_id,
        application_id=application_id,
        candidate_id=body.candidate_id,
        employer_id=body.employer_id,
        created_by=caller.user_id,
        interview_time=body.interview_time,
        reminder_time=reminder_time,
        details={
            key: value
            for key, value in (
                ("candidate_contact", candidate_contact),
                ("employer_contact", employer_contact),
                ("channels", channels),
            )
            if value is not None
        },
    )
    async with ctx.pool.acquire() as conn, conn.transaction():
        record = await store.insert(conn, row)
        await audit.record(
            conn,
            audit_entry(
                request,
                "reminder.create",
                {
                    "reminder_id": str(row.id),
                    "application_id": application_id,
                    "reminder_time": reminder_time.isoformat(),
                },
            ),
        )
        response = await remember(
            request,
            conn,
            json_response(
                {"reminder_id": str(row.id), **reminder_json(record)},
                status=201,
                headers={"Location": f"/reminders/{row.id}/"},
            ),
        )
    await _put_on_wheel(ctx, caller.tenant_id, row.id, reminder_time)
    ctx.metrics.reminders.labels("scheduled").inc()
    return response


async def list_reminders(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).reminder_query)
    limit, before, status = query.limit, query.before, query.status
    application_id = query.application_id
    rows = await store.list_visible(
        ctx.pool,
        caller.tenant_id,
        policy.only_own(caller),
        before=before,
        status=status,
        application_id=application_id,
        limit=limit + 1,
    )
    rows, headers = page(request, rows, limit)
    return json_response([reminder_json(r) for r in rows], headers=headers)


async def _visible_reminder(request: web.Request) -> asyncpg.Record:
    ctx = services(request)
    caller = identity(request)
    reminder_id = parse_uuid(request.match_info["id"])
    row = None if reminder_id is None else await store.get(ctx.pool, caller.tenant_id, reminder_id)
    if row is None:
        raise not_found("reminder")
    involved = (row["candidate_id"], row["employer_id"], row["created_by"])
    if not policy.may_view_reminder(caller, involved):
        raise not_found("reminder")
    return row


async def get_reminder(request: web.Request) -> web.Response:
    return json_response(reminder_json(await _visible_reminder(request)))


def _not_scheduled(row: asyncpg.Record) -> Problem:
    return Problem(
        409,
        f"the reminder is {row['status']}; only scheduled reminders can change",
        kind="reminder-not-scheduled",
    )


async def reschedule_reminder(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    current = await _visible_reminder(request)
    body = await read_model(request, schemas(request).reminder_patch)
    new_interview = body.interview_time or current["interview_time"]
    new_reminder = body.reminder_time or current["reminder_time"]
    problems = time_problems(new_interview, new_reminder)
    if not policy.may_change_reminder(caller, current["created_by"], current["employer_id"]):
        raise forbidden("only the reminder's creator, its employer or a service may change it")
    if problems:
        raise unsendable(problems)  # with the stored time the body left out: state
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.reschedule(
            conn, caller.tenant_id, current["id"], new_interview, new_reminder
        )
        if row is None:
            raise _not_scheduled(await _visible_reminder(request))
        await audit.record(
            conn,
            audit_entry(
                request,
                "reminder.reschedule",
                {
                    "reminder_id": str(current["id"]),
                    "reminder_time": new_reminder.isoformat(),
                    "interview_time": new_interview.isoformat(),
                },
            ),
        )
    # the guarded UPDATE already decided; the wheel follows (a stale entry that fires early
    # finds the reminder not due and is dropped)
    await _put_on_wheel(ctx, caller.tenant_id, row["id"], row["reminder_time"])
    return json_response(reminder_json(row))


async def cancel_reminder(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    current = await _visible_reminder(request)
    if not policy.may_change_reminder(caller, current["created_by"], current["employer_id"]):
        raise forbidden("only the reminder's creator, its employer or a service may cancel it")
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.cancel(conn, caller.tenant_id, current["id"])
        if row is None:
            raise _not_scheduled(await _visible_reminder(request))
        await audit.record(
            conn, audit_entry(request, "reminder.cancel", {"reminder_id": str(current["id"])})
        )
    try:
        await ctx.schedule.remove(wheel_item(ctx.keys, caller.tenant_id, current["id"]))
    except RedisError as exc:  # a leftover entry finds the reminder cancelled and is dropped
        log.warning("cancelled reminder left on the wheel", extra={"error": repr(exc)})
    ctx.metrics.reminders.labels("cancelled").inc()
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/reminders/create/", create_reminder)
    app.router.add_post("/api/reminders/create/", create_reminder)
    app.router.add_get("/reminders/", list_reminders)
    app.router.add_get("/api/reminders/", list_reminders)
    for prefix in ("", "/api"):
        app.router.add_get(f"{prefix}/reminders/{{id}}/", get_reminder)
        app.router.add_patch(f"{prefix}/reminders/{{id}}/", reschedule_reminder)
        app.router.add_delete(f"{prefix}/reminders/{{id}}/", cancel_reminder)
