"""Notifications: send (any channel), the notification center, and one notification's status."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from notifyd.accept.orders import Order, Refused
from notifyd.accept.outbox import announce
from notifyd.accept.prepare import prepare
from notifyd.accept.rows import SEND_ACTION, audit_details, new_row
from notifyd.auth import policy
from notifyd.http.context import (
    audit_entry,
    identity,
    request_id,
    services,
    tenant_settings_of,
)
from notifyd.http.idempotency import remember
from notifyd.http.limits import check_daily_quota, check_send_rate
from notifyd.http.problems import Problem, forbidden, not_found, unsendable
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import (
    read_model,
    read_query,
    schemas,
)
from notifyd.ids import parse_uuid
from notifyd.limits import QUOTA_CHANNELS
from notifyd.requeue import RETRY_ACTION, delivery_ref, restart_failed
from notifyd.store import audit
from notifyd.store import notifications as store

log = logging.getLogger("notifyd.http.notifications")


def notification_json(n: store.Notification) -> dict[str, Any]:
    """The seeds' field names (`notification_type`, `message`, `is_sent`) plus delivery state."""
    return {
        "id": str(n.id),
        "tenant_id": n.tenant_id,
        "notification_type": n.channel,
        "recipient": n.recipient,
        "user_id": n.user_id,
        "created_by": n.created_by,
        "subject": n.subject,
        "message": n.body,
        "html": n.html_body,
        "template_key": n.template_key,
        "context": n.context,
        "locale": n.locale,
        "category": n.category,
        "critical": n.critical,
        "status": n.status,
        "is_sent": n.status in ("sent", "delivered"),
        "is_read": n.read_at is not None,
        "read_at": iso(n.read_at),
        "attempts": n.attempts,
        "last_error": n.last_error,
        "provider_message_id": n.provider_message_id,
        "provider_status": n.provider_status,
        "next_attempt_at": iso(n.next_attempt_at),
        "created_at": iso(n.created_at),
        "updated_at": iso(n.updated_at),
        "sent_at": iso(n.sent_at),
        "delivered_at": iso(n.delivered_at),
    }


async def send_notification(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    await check_send_rate(request)
    limits = ctx.settings
    body = await read_model(request, schemas(request).send)
    channel = body.notification_type
    if not policy.may_send(caller, channel, limits.send_policy):
        raise forbidden(f"role {caller.role!r} may not send {channel} notifications")
    critical = bool(body.critical)
    if critical and not policy.may_send_critical(caller):
        raise forbidden("only service and admin tokens may send critical notifications")

    order = Order(
        channel=channel,
        recipient=body.recipient,
        subject=body.subject,
        message=body.message,
        template_key=body.template_key,
        context=body.context,
        user_id=body.user_id,
        category=body.category,
        critical=critical,
        locale=body.locale,
    )
    tenant = await tenant_settings_of(ctx, caller.tenant_id)
    if channel in QUOTA_CHANNELS:  # an in-app send counts against no quota: no call at all
        await check_daily_quota(ctx, caller, channel, tenant)
    try:
        prepared = await prepare(ctx.pool, limits, tenant, caller.tenant_id, order)
    except Refused as exc:
        raise unsendable(exc.problems) from None
    idempotency_key = request.headers.get("Idempotency-Key")
    row = new_row(
        prepared,
        tenant_id=caller.tenant_id,
        created_by=caller.user_id,
        idempotency_key=idempotency_key,
        request_id=request_id(request) or None,
    )
    entry = audit_entry(request, SEND_ACTION, audit_details(row))
    accepted = json_response(
        {"notification_id": str(row.id), "status": "queued"},
        status=202,
        headers={"Location": f"/notifications/{row.id}/"},
    )
    if idempotency_key is None:
        # the common case: committed together with the sends of other requests in flight
        await ctx.outbox.put(row, entry)
        return accepted
    async with ctx.pool.acquire() as conn, conn.transaction():
        await store.insert_many_audited(conn, [row], [entry])
        response = await remember(request, conn, accepted)
    # committed: a Redis failure now still answers 202; the sweeper enqueues it later
    await announce(ctx.producer, ctx.keys, [row], ctx.metrics)
    return response


async def list_notifications(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).notification_query)
    limit, before, unread, channel = query.limit, query.before, query.unread, query.type
    rows = await store.list_for_user(
        ctx.pool,
        caller.tenant_id,
        caller.user_id,
        before=before,
        unread_only=unread,
        channel=channel,
        limit=limit + 1,
    )
    unread_count = await store.unread_count(ctx.pool, caller.tenant_id, caller.user_id)
    rows, headers = page(request, rows, limit)
    headers["X-Unread-Count"] = str(unread_count)
    return json_response([notification_json(r) for r in rows], headers=headers)


async def get_notification(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    notification_id = parse_uuid(request.match_info["id"])
    row = None
    if notification_id is not None:
        row = await store.get(ctx.pool, caller.tenant_id, notification_id)
    if row is None or not policy.may_view_notification(caller, row.user_id, row.created_by):
        raise not_found("notification")
    return json_response(notification_json(row))


async def mark_as_read(request: web.Request) -> web.Response:
    ctx = services(request)
    caller = identity(request)
    body = await read_model(request, schemas(request).mark_read)
    ids, everything = body.ids, bool(body.all)
    async with ctx.pool.acquire() as conn, conn.transaction():
        updated = await store.mark_read(
            conn, caller.tenant_id, caller.user_id, None if everything else ids
        )
        await audit.record(
            conn,
            audit_entry(
                request,
                "notification.mark_read",
                {"all": bool(everything), "ids": [str(i) for i in ids or []], "updated": updated},
            ),
        )
        unread = await store.unread_count(conn, caller.tenant_id, caller.user_id)
        response = await remember(
            request, conn, json_response({"updated": updated, "unread_count": unread})
        )
    # every open socket of this user (other tabs, other devices) learns the new count, as
    # after a socket's own mark_read; committed already, so a Redis failure only logs
    try:
        await ctx.history.signal_user(
            caller.tenant_id,
            caller.user_id,
            {"type": "unread_count", "count": unread, "updated": updated},
        )
    except RedisError as exc:
        log.warning("unread count not signalled", extra={"error": repr(exc)})
    return response


async def retry_notification(request: web.Request) -> web.Response:
    """An admin puts a failed delivery back in line, with a fresh set of attempts."""
    ctx = services(request)
    caller = identity(request)
    notification_id = parse_uuid(request.match_info["id"])
    row = (
        None
        if notification_id is None
        else await store.get(ctx.pool, caller.tenant_id, notification_id)
    )
    if row is None:
        raise not_found("notification")
    if not policy.may_requeue(caller):
        raise forbidden("only admins may requeue a failed delivery")
    async with ctx.pool.acquire() as conn, conn.transaction():
        channel = await restart_failed(
            conn,
            caller.tenant_id,
            row.id,
            audit_entry(request, RETRY_ACTION, {"notification_id": str(row.id)}),
        )
        if channel is None:
            raise Problem(
                409,
                f"the notification is {row.status}; only failed deliveries are requeued",
                kind="not-failed",
            )
        fresh = await store.get(conn, caller.tenant_id, row.id)
        assert fresh is not None
        response = await remember(
            request, conn, json_response(notification_json(fresh), status=202)
        )
    try:
        await ctx.producer.add(ctx.keys.deliver(channel), delivery_ref(caller.tenant_id, row.id))
    except RedisError as exc:
        # committed as `dispatched`: the sweeper puts it back on the stream
        log.warning("requeued delivery left for the sweeper", extra={"error": repr(exc)})
    return response


def add_routes(app: web.Application) -> None:
    for base in ("/notifications", "/api/notifications"):
        app.router.add_post(f"{base}/send/", send_notification)
        app.router.add_get(f"{base}/", list_notifications)
        app.router.add_post(f"{base}/mark-as-read/", mark_as_read)
        app.router.add_get(f"{base}/{{id}}/", get_notification)
        app.router.add_post(f"{base}/{{id}}/retry/", retry_notification)
