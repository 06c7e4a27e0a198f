"""The typed dependencies every handler reaches through `request.app[SERVICES]`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from notifyd.accept import Outbox
from notifyd.auth.identity import Identity
from notifyd.auth.tokens import TokenVerifier
from notifyd.ids import OpaqueIdRule
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.realtime.chat import Chat
from notifyd.realtime.history import History
from notifyd.realtime.hub import Hub
from notifyd.realtime.presence import Presence
from notifyd.secretbox import SecretError
from notifyd.settings import Settings
from notifyd.store.audit import AuditEntry
from notifyd.store.tenants import TenantSettings, TenantSettingsCache
from notifyd.streams.producer import Producer
from notifyd.streams.schedule import Schedule


@dataclass(frozen=True)
class Services:
    settings: Settings
    pool: asyncpg.Pool
    redis: Redis
    producer: Producer
    outbox: Outbox
    schedule: Schedule
    hub: Hub
    history: History
    chat: Chat
    presence: Presence
    keys: Keys
    metrics: Metrics
    verifier: TokenVerifier
    id_rule: OpaqueIdRule
    tenant_settings: TenantSettingsCache
    actors_healthy: Callable[[], bool]
    actors_status: Callable[[], dict[str, str]]


SERVICES = web.AppKey("services", Services)
IDENTITY_KEY = web.RequestKey("identity", Identity)
REQUEST_ID_KEY = web.RequestKey("request_id", str)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def identity(request: web.Request) -> Identity:
    """The verified caller; the auth middleware guarantees it on every non-public route."""
    found: Identity | None = request.get(IDENTITY_KEY)
    if found is None:
        raise RuntimeError("identity requested on a public route")
    return found


def request_id(request: web.Request) -> str:
    found: str = request.get(REQUEST_ID_KEY, "")
    return found


def client_ip(request: web.Request) -> str | None:
    """The address of whoever made the request, for the audit log.

    The peer, unless it is one of `NOTIFYD_TRUSTED_PROXIES`: then the client is the last
    address in `X-Forwarded-For` that is not a trusted proxy. Each proxy appends the address
    it was reached from, so what lies left of the first untrusted hop is whatever the client
    chose to send and is never believed; a header from a peer we do not trust is ignored.
    """
    peer = request.remote
    proxies = services(request).settings.trusted_proxies
    if not proxies or not peer or not _among(peer, proxies):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getall("X-Forwarded-For", ())
        for hop in header.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _among(hop, proxies):
            return hop if _is_address(hop) else peer
    return hops[0] if hops else peer  # proxies all the way: the first one seen


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _among(text: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return any(address in network for network in networks)


def audit_entry(request: web.Request, action: str, details: dict[str, Any]) -> AuditEntry:
    """An audit row for a write made by the verified caller of `request`."""
    caller = identity(request)
    return AuditEntry(
        tenant_id=caller.tenant_id,
        user_id=caller.user_id,
        action=action,
        ip_address=client_ip(request),
        request_id=request_id(request) or None,
        details={"role": caller.role, **details},
    )


async def tenant_settings_of(ctx: Services, tenant_id: str) -> TenantSettings:
    """The tenant's own settings; the global ones when its secrets cannot be read (what the
    request path needs of them, region and locale, is not secret; the senders raise the
    alarm about the secrets)."""
    try:
        return await ctx.tenant_settings.get(tenant_id)
    except SecretError:
        return TenantSettings()
