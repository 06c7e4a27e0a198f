"""Where the routes meet the rate limits, daily quotas and socket caps (docs/limits.md).

A refused send is `429 application/problem+json` with `Retry-After` (whole seconds, rounded
up) and a `limit` member naming the limit that said no; nothing is stored. A refused socket
is accepted and closed with `SOCKETS_FULL` (4029): a browser never shows the body of a
refused handshake, so the close code is the only answer it can read.
"""

from __future__ import annotations

from aiohttp import web

from notifyd.auth.identity import Identity
from notifyd.http.context import Services, identity, services
from notifyd.http.problems import Problem
from notifyd.http.websockets import refuse
from notifyd.limits import Refusal, platform_quota
from notifyd.realtime.ports import Seat, SeatRefused
from notifyd.store.tenants import TenantSettings

SOCKETS_FULL = 4029  # as HTTP 429: too many sockets open for this user or tenant


_TITLES = {"unsubscribe": "Too many requests"}


def refused(ctx: Services, refusal: Refusal) -> Problem:
    """The 429 of a refusal (counted in `limit_refusals`)."""
    ctx.metrics.limit_refusals.labels(refusal.limit).inc()
    quota = refusal.limit.endswith("_daily")
    return Problem(
        429,
        f"{refusal.detail}; retry in {refusal.retry_after_header} s",
        kind="quota-exceeded" if quota else "rate-limited",
        title=_TITLES.get(refusal.limit, "Daily quota used up" if quota else "Too many sends"),
        headers={"Retry-After": refusal.retry_after_header},
        extensions={"limit": refusal.limit},
    )


async def check_send_rate(request: web.Request) -> None:
    """Counts one send of the caller against its rates; raises the 429 when refused."""
    ctx = services(request)
    caller = identity(request)
    refusal = await ctx.limiter.check_send(caller, ctx.tenant_limits.of(caller.tenant_id))
    if refusal is not None:
        raise refused(ctx, refusal)


async def check_daily_quota(
    ctx: Services, caller: Identity, channel: str, tenant: TenantSettings
) -> None:
    """Counts one email or SMS that will go through the platform's own relay or Twilio
    account (the tenant has none of its own) against the tenant's daily quota."""
    quota = platform_quota(
        ctx.tenant_limits.of(caller.tenant_id),
        channel,
        own_smtp=tenant.smtp is not None,
        own_twilio=tenant.twilio is not None,
    )
    refusal = await ctx.limiter.check_quota(channel, caller.tenant_id, quota)
    if refusal is not None:
        raise refused(ctx, refusal)


async def take_seat(
    request: web.Request, ws: web.WebSocketResponse, caller: Identity
) -> Seat | None:
    """A seat under the socket caps for this socket (its `live` gives it back when the
    socket is done), or None once the socket is closed with `SOCKETS_FULL`."""
    ctx = services(request)
    limits = ctx.tenant_limits.of(caller.tenant_id)
    seat = await ctx.seats.take(
        caller.tenant_id, caller.user_id, limits.sockets_per_user, limits.sockets_per_tenant
    )
    if isinstance(seat, SeatRefused):
        ctx.metrics.limit_refusals.labels(seat.limit).inc()
        await refuse(request, ws, SOCKETS_FULL, seat.detail.encode()[:120])
        return None
    return seat
