"""The typed dependencies every handler reaches through `request.app[SERVICES]`."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from notifyd.accept.outbox import Outbox
from notifyd.auth.identity import Identity
from notifyd.auth.tokens import TokenVerifier
from notifyd.egress import Egress
from notifyd.http.problems import Problem
from notifyd.ids import OpaqueIdRule
from notifyd.keys import Keys
from notifyd.metrics import Metrics
from notifyd.ratelimit import Limiter
from notifyd.realtime.chat import Chat
from notifyd.realtime.history import History
from notifyd.realtime.ports import Channels, RoomPresence, SocketCaps
from notifyd.secretbox import SecretError
from notifyd.settings import Settings
from notifyd.store.audit import AuditEntry
from notifyd.store.limits import TenantLimits
from notifyd.store.tenants import SourceUnavailable, TenantSettings, TenantSettingsCache
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
    hub: Channels  # the hub actor, reached through its port (handlers never call actors)
    history: History
    chat: Chat
    presence: RoomPresence
    keys: Keys
    metrics: Metrics
    verifier: TokenVerifier
    id_rule: OpaqueIdRule
    tenant_settings: TenantSettingsCache
    egress: Egress
    actors_healthy: Callable[[], bool]
    actors_status: Callable[[], dict[str, str]]
    limiter: Limiter
    tenant_limits: TenantLimits
    seats: SocketCaps


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
    """The address of whoever made the request, for the audit log."""
    return forwarded_client(
        request.remote,
        request.headers.getall("X-Forwarded-For", ()),
        services(request).settings.trusted_proxies,
    )


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def forwarded_client(
    peer: str | None, forwarded_for: Sequence[str], proxies: Networks
) -> str | None:
    """The peer, unless it is one of the trusted `proxies`: then the client is the last
    address in `X-Forwarded-For` that is not a trusted proxy.

    Each proxy appends the address it was reached from, so what lies left of the first
    untrusted hop is whatever the client chose to send and is never believed; a header from
    a peer we do not trust is ignored. A hop that is not a bare address (a port, brackets,
    junk) ends the walk at the proxy's own address. Addresses are given in their canonical
    form, an IPv4-mapped IPv6 one as IPv4, without a scope id.
    """
    if not proxies or not peer:
        return peer
    peer_address = _address(peer)
    if peer_address is None or not _among(peer_address, proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",") if hop.strip()]
    last_proxy: Address | None = None  # the left-most trusted hop walked so far
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        if not _among(address, proxies):
            return str(address)
        last_proxy = address
    return str(last_proxy) if last_proxy is not None else peer


def _address(text: str) -> Address | None:
    """`text` as an address in canonical form (IPv4-mapped → IPv4, no scope id), or None."""
    try:
        address: Address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _among(address: Address, networks: Networks) -> bool:
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
        return await ctx.tenant_settings.public(tenant_id)
    except SourceUnavailable as exc:
        raise source_unavailable(exc) from None


def source_unavailable(exc: SourceUnavailable) -> Problem:
    """503: the tenant's configuration source has not answered yet for this tenant; a send
    is not made with settings and templates the source may override."""
    return Problem(
        503,
        str(exc),
        kind="tenant-config-unavailable",
        headers={"Retry-After": "5"},
    )
