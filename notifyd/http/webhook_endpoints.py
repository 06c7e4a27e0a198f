"""A tenant's webhook endpoints (issue 29), for its admins: `/webhooks/endpoints/...`.

- `POST /webhooks/endpoints/` `{url, events, description?}` → 201 with the secret, shown this
  once; `GET` lists them, `GET`/`PATCH`/`DELETE /webhooks/endpoints/{id}/` one of them,
  `POST .../rotate-secret/` a new secret (the old one keeps signing beside it for
  `NOTIFYD_WEBHOOK_SECRET_OVERLAP`, so receivers can switch without losing a request).
- `GET .../deliveries/`: each event sent there, newest first, with its attempts (time, status
  code, latency, error); `POST .../deliveries/{delivery_id}/replay/` sends one again, with
  the same `webhook-id`, and a new retry window.

A URL must be https (http only where `NOTIFYD_WEBHOOK_ALLOW_HTTP`), and its host goes through
the egress policy, with webhook ports instead of SMTP's: an IP literal or a name resolving to
a loopback, private or otherwise special address (outside `NOTIFYD_EGRESS_ALLOWED_NETWORKS`)
is an `unsendable` 422 naming `url`. A name that does not resolve (yet) is stored; every
attempt checks again where it connects, and that check is the one that counts.

Secrets: made here (`whsec_` + 32 random bytes), stored only sealed with
`NOTIFYD_TENANT_SECRET_KEY` (without it, a create answers 409 rather than store one in
clear), answered once, never logged or audited. An `Idempotency-Key` is ignored on the two
routes that answer a secret: the replayed answer would be kept in clear in PostgreSQL.

Another tenant's endpoint id is a 404, as a made-up one.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg
from aiohttp import web
from yarl import URL

from notifyd import webhooks
from notifyd.auth import policy
from notifyd.egress import EgressRefused, ResolveFailed
from notifyd.http import idempotency
from notifyd.http.context import audit_entry, identity, services
from notifyd.http.problems import FieldError, Problem, forbidden, not_found, unsendable
from notifyd.http.responses import iso, json_response, page
from notifyd.http.validation import read_model, read_query, schemas
from notifyd.ids import parse_uuid, uuid7
from notifyd.secretbox import SecretBox
from notifyd.store import audit
from notifyd.store import webhooks as store

log = logging.getLogger("notifyd.http.webhook_endpoints")

BASE = "/webhooks/endpoints/"


def endpoint_json(row: asyncpg.Record, secret: str | None = None) -> dict[str, Any]:
    """The answer's shape (`schemas.webhooks.WebhookEndpoint`, `...WithSecret`)."""
    answer = {
        "id": str(row["id"]),
        "url": row["url"],
        "events": list(row["events"]),
        "description": row["description"],
        "enabled": row["enabled"],
        "disabled_reason": row["disabled_reason"],
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }
    if secret is not None:
        answer["secret"] = secret
    return answer


def delivery_json(row: asyncpg.Record) -> dict[str, Any]:
    """`schemas.webhooks.WebhookDelivery`."""
    waiting = row["status"] in ("pending", "sending")
    return {
        "id": str(row["id"]),
        "endpoint_id": str(row["endpoint_id"]),
        "event_type": row["event_type"],
        "occurred_at": iso(row["occurred_at"]),
        "data": row["data"],
        "status": row["status"],
        "attempts": row["attempts"],
        "next_attempt_at": iso(row["next_attempt_at"]) if waiting else None,
        "done_at": iso(row["done_at"]),
        "last_status_code": row["last_status_code"],
        "last_error": row["last_error"],
        "last_latency_ms": row["last_latency_ms"],
        "attempt_log": row["attempt_log"],
    }


def _require_admin(request: web.Request) -> None:
    if not policy.may_manage_webhooks(identity(request)):
        raise forbidden("only the tenant's admins may manage its webhook endpoints")


def _box(request: web.Request) -> SecretBox:
    box = SecretBox.from_settings(services(request).settings)
    if box is None:
        raise Problem(
            409,
            "webhook secrets cannot be stored: the operator must set NOTIFYD_TENANT_SECRET_KEY "
            "(secrets are only ever stored encrypted)",
            kind="secret-key-missing",
        )
    return box


def _path_uuid(request: web.Request, name: str, what: str) -> uuid.UUID:
    found = parse_uuid(request.match_info[name])
    if found is None:
        raise not_found(what)
    return found


async def _endpoint(request: web.Request) -> asyncpg.Record:
    """The path's endpoint, of the caller's tenant (else 404)."""
    endpoint_id = _path_uuid(request, "id", "webhook endpoint")
    row = await store.get(services(request).pool, identity(request).tenant_id, endpoint_id)
    if row is None:
        raise not_found("webhook endpoint")
    return row


async def _check_url(request: web.Request, url: str) -> None:
    """https unless the operator allows http, and a host the egress policy allows (422
    `unsendable` naming `url`)."""
    ctx = services(request)
    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError:
        raise unsendable([FieldError("url", "is not a URL notifyd can call")]) from None
    if parsed.scheme != "https" and not ctx.settings.webhook_allow_http:
        raise unsendable(
            [FieldError("url", "must be https:// (the operator does not allow http://)")]
        )
    host = parsed.raw_host or ""
    egress = ctx.egress.for_ports(ctx.settings.webhook_allowed_ports, "a webhook port")
    try:
        await egress.check(host, port or 443)
    except EgressRefused as exc:
        log.info(
            "webhook URL refused by the egress policy",
            extra={"host": host, "address": exc.address, "port": port},
        )
        raise unsendable([FieldError("url", exc.message)]) from None
    except ResolveFailed as exc:
        # DNS may be set up after the endpoint; every attempt checks again where it connects
        log.info("webhook host stored unresolved", extra={"error": str(exc)})


async def create_endpoint(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    body = await read_model(request, schemas(request).webhook_create)
    box = _box(request)
    await _check_url(request, body.url)
    events = list(dict.fromkeys(body.events))  # each once, in the order given
    secret = webhooks.new_secret()
    async with ctx.pool.acquire() as conn, conn.transaction():
        try:
            row = await store.create(
                conn,
                caller.tenant_id,
                uuid7(),
                url=body.url,
                events=events,
                description=body.description or "",
                secret_enc=box.encrypt(secret),
                cap=ctx.settings.webhook_endpoints_per_tenant,
            )
        except store.TooManyEndpoints:
            raise Problem(
                409,
                f"the tenant has {ctx.settings.webhook_endpoints_per_tenant} webhook endpoints "
                "already (NOTIFYD_WEBHOOK_ENDPOINTS_PER_TENANT); delete one first",
                kind="too-many-endpoints",
            ) from None
        await audit.record(
            conn,
            audit_entry(
                request,
                "webhook.endpoint_create",
                {"endpoint_id": str(row["id"]), "url": body.url, "events": events},
            ),
        )
    return json_response(
        endpoint_json(row, secret),
        status=201,
        headers={"Location": f"{BASE}{row['id']}/"},
    )


async def list_endpoints(request: web.Request) -> web.Response:
    _require_admin(request)
    rows = await store.list_endpoints(services(request).pool, identity(request).tenant_id)
    return json_response([endpoint_json(row) for row in rows])


async def get_endpoint(request: web.Request) -> web.Response:
    _require_admin(request)
    return json_response(endpoint_json(await _endpoint(request)))


async def patch_endpoint(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    endpoint_id = _path_uuid(request, "id", "webhook endpoint")
    body = await read_model(request, schemas(request).webhook_patch)
    values = {
        name: getattr(body, name)
        for name in body.model_fields_set
        if getattr(body, name) is not None
    }
    if "url" in values:
        await _check_url(request, values["url"])
    if "events" in values:
        values["events"] = list(dict.fromkeys(values["events"]))
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.patch(conn, caller.tenant_id, endpoint_id, values)
        if row is None:
            raise not_found("webhook endpoint")
        if values.get("enabled") is False:
            await store.fail_waiting(conn, endpoint_id, "the endpoint was turned off")
        await audit.record(
            conn,
            audit_entry(
                request, "webhook.endpoint_update", {"endpoint_id": str(endpoint_id), **values}
            ),
        )
    return json_response(endpoint_json(row))


async def delete_endpoint(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    endpoint_id = _path_uuid(request, "id", "webhook endpoint")
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await store.delete(conn, caller.tenant_id, endpoint_id):
            raise not_found("webhook endpoint")
        await audit.record(
            conn,
            audit_entry(request, "webhook.endpoint_delete", {"endpoint_id": str(endpoint_id)}),
        )
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    endpoint_id = _path_uuid(request, "id", "webhook endpoint")
    box = _box(request)
    secret = webhooks.new_secret()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.rotate(
            conn,
            caller.tenant_id,
            endpoint_id,
            box.encrypt(secret),
            ctx.settings.webhook_secret_overlap,
        )
        if row is None:
            raise not_found("webhook endpoint")
        await audit.record(
            conn,
            audit_entry(request, "webhook.secret_rotate", {"endpoint_id": str(endpoint_id)}),
        )
    return json_response(endpoint_json(row, secret))


async def list_deliveries(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    query = read_query(request, schemas(request).page_query)
    endpoint = await _endpoint(request)
    rows = await store.deliveries(
        ctx.pool, caller.tenant_id, endpoint["id"], query.before, query.limit + 1
    )
    rows, headers = page(request, rows, query.limit)
    return json_response([delivery_json(row) for row in rows], headers=headers)


async def replay_delivery(request: web.Request) -> web.Response:
    _require_admin(request)
    ctx = services(request)
    caller = identity(request)
    endpoint_id = _path_uuid(request, "id", "webhook endpoint")
    delivery_id = _path_uuid(request, "delivery_id", "webhook delivery")
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await store.replay(conn, caller.tenant_id, endpoint_id, delivery_id)
        if row is None:
            raise not_found("webhook delivery")
        await audit.record(
            conn,
            audit_entry(
                request,
                "webhook.delivery_replay",
                {"endpoint_id": str(endpoint_id), "delivery_id": str(delivery_id)},
            ),
        )
        await store.wake_senders(conn)  # at the commit
    return json_response(delivery_json(row), status=202)


def add_routes(app: web.Application) -> None:
    for prefix in ("", "/api"):
        base = prefix + BASE
        app.router.add_post(base, idempotency.exempt(create_endpoint))
        app.router.add_get(base, list_endpoints)
        app.router.add_get(base + "{id}/", get_endpoint)
        app.router.add_patch(base + "{id}/", patch_endpoint)
        app.router.add_delete(base + "{id}/", delete_endpoint)
        app.router.add_post(base + "{id}/rotate-secret/", idempotency.exempt(rotate_secret))
        app.router.add_get(base + "{id}/deliveries/", list_deliveries)
        app.router.add_post(base + "{id}/deliveries/{delivery_id}/replay/", replay_delivery)
