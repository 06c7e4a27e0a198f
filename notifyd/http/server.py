"""The aiohttp application: middlewares in their fixed order and every resource's routes."""

from __future__ import annotations

from aiohttp import web

from notifyd.http import (
    audit,
    messages,
    notifications,
    openapi,
    ops,
    preferences,
    recipients,
    reminders,
    rooms,
    templates,
    tenants,
    ui,
    webhook_endpoints,
    webhooks,
    websockets,
    workflows,
    ws_chat,
    ws_notifications,
)
from notifyd.http.context import SERVICES, Services
from notifyd.http.idempotency import idempotency_middleware
from notifyd.http.middleware import auth_middleware, cors_middleware, edge_middleware
from notifyd.http.validation import SCHEMAS
from notifyd.schemas.registry import Schemas


def build_app(services: Services) -> web.Application:
    app = web.Application(
        middlewares=[cors_middleware, edge_middleware, auth_middleware, idempotency_middleware],
        client_max_size=services.settings.max_body_bytes,
    )
    app[SERVICES] = services
    app[SCHEMAS] = Schemas.build(services.settings)  # once: every limit that is a setting
    for module in (
        ops,
        openapi,
        notifications,
        messages,
        reminders,
        recipients,
        workflows,
        audit,
        tenants,
        preferences,
        templates,
        rooms,
        webhooks,
        webhook_endpoints,
        ui,
        websockets,
        ws_notifications,
        ws_chat,
    ):
        module.add_routes(app)
    return app
