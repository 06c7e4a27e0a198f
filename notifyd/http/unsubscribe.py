"""One-click unsubscribe (RFC 8058, issue 29): `GET`/`POST /unsubscribe/{token}`.

No bearer token: a mailbox provider (Gmail, Yahoo) POSTs to the List-Unsubscribe URL with the
form body `List-Unsubscribe=One-Click`, and a person who follows the link gets a small page
whose one button POSTs the same. The token (`notifyd.unsubscribe`) is what authenticates:
signed, it names the tenant, the recipient and the category; a forged, altered, malformed or
over-long one answers 404 as an unknown path would, and reads and changes nothing.

A POST opts the recipient out and answers 200 (also when it was out already):
- with a user id: the user's preference for that category (the one `/preferences/` shows,
  which covers the category on every channel), or for email altogether when the mail had no
  category;
- with only an address (the notification named no user): a suppression-list entry for that
  category (every category when it had none), reason `unsubscribe`.
Both are audited (`preferences.unsubscribe`). `critical` mail carries no link and is not
stopped by either.

The page has no script; every value shown is escaped. Both methods count against
NOTIFYD_UNSUBSCRIBE_RATE (per client address or for all, NOTIFYD_UNSUBSCRIBE_RATE_SCOPE): a
429 with Retry-After past it. Bodies are bounded by BODY_MAX.
"""

from __future__ import annotations

import html
import logging
from urllib.parse import parse_qs

from aiohttp import web

from notifyd.http.context import Services, client_ip, request_id, services
from notifyd.http.limits import refused
from notifyd.http.problems import FieldError, Problem, invalid, not_found
from notifyd.store import audit
from notifyd.store import preferences as preference_store
from notifyd.store import suppressions as suppression_store
from notifyd.unsubscribe import PATH, Unsubscribe, derive_key, verify

log = logging.getLogger("notifyd.http.unsubscribe")

FORM = "application/x-www-form-urlencoded"
FIELD = "List-Unsubscribe"
ONE_CLICK = "One-Click"
BODY_MAX = 1024  # the one field is 29 bytes; room for what a client adds, no more


def _key(ctx: Services) -> bytes:
    if not ctx.settings.unsubscribe_secret:
        raise not_found("unsubscribe link")  # one-click is off: no link was ever made
    return derive_key(ctx.settings.unsubscribe_secret)


async def _limited(request: web.Request) -> Services:
    ctx = services(request)
    scope = ctx.settings.unsubscribe_rate_scope
    who = "*" if scope == "global" else (client_ip(request) or "unknown")
    refusal = await ctx.limiter.check_unsubscribe(
        who, ctx.settings.unsubscribe_rate, ctx.settings.unsubscribe_burst
    )
    if refusal is not None:
        raise refused(ctx, refusal)
    return ctx


def _verified(request: web.Request, ctx: Services) -> Unsubscribe:
    found = verify(_key(ctx), request.match_info["token"])
    if found is None:
        raise not_found("unsubscribe link")
    return found


def _what(found: Unsubscribe) -> str:
    return f"emails in the category “{found.category}”" if found.category else "these emails"


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        f'<body style="font-family:sans-serif;max-width:32em;margin:3em auto">{body}</body></html>'
    )
    return web.Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def unsubscribe_page(request: web.Request) -> web.Response:
    ctx = await _limited(request)
    found = _verified(request, ctx)
    what = html.escape(_what(found))
    return _page(
        "Unsubscribe",
        f"<h1>Unsubscribe</h1><p>Stop receiving {what}?</p>"
        '<form method="post">'
        f'<input type="hidden" name="{FIELD}" value="{ONE_CLICK}">'
        '<button type="submit">Unsubscribe</button></form>',
    )


async def _one_click_body(request: web.Request) -> None:
    """The body RFC 8058 prescribes: `List-Unsubscribe=One-Click`, form-encoded."""
    if request.content_length is not None and request.content_length > BODY_MAX:
        raise Problem(413, f"the body may be at most {BODY_MAX} bytes", kind="too-large")
    if request.content_type != FORM:
        raise Problem(415, f"send the form as {FORM}", kind="unsupported-media-type")
    raw = await request.content.read(BODY_MAX + 1)
    if len(raw) > BODY_MAX:
        raise Problem(413, f"the body may be at most {BODY_MAX} bytes", kind="too-large")
    form = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    if form.get(FIELD) != [ONE_CLICK]:
        raise invalid([FieldError(FIELD, f"must be {ONE_CLICK} (RFC 8058)")])


async def unsubscribe(request: web.Request) -> web.Response:
    ctx = await _limited(request)
    found = _verified(request, ctx)
    await _one_click_body(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if found.user_id is not None:
            await preference_store.opt_out(
                conn, found.tenant_id, found.user_id, category=found.category or None
            )
        else:
            assert found.address is not None
            await suppression_store.add(
                conn,
                found.tenant_id,
                "email",
                found.address,
                "unsubscribe",
                "one-click unsubscribe (RFC 8058)",
                category=found.category or None,
            )
        details: dict[str, object] = {"category": found.category or None, "channel": "email"}
        if found.user_id is None:
            details["address"] = found.address
        await audit.record(
            conn,
            audit.AuditEntry(
                tenant_id=found.tenant_id,
                user_id=found.user_id,
                action="preferences.unsubscribe",
                ip_address=client_ip(request),
                request_id=request_id(request) or None,
                details=details,
            ),
        )
    log.info("one-click unsubscribe", extra={"tenant_id": found.tenant_id})
    what = html.escape(_what(found))
    return _page("Unsubscribed", f"<h1>Unsubscribed</h1><p>You will no longer receive {what}.</p>")


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH + "{token}", unsubscribe_page)
    app.router.add_post(PATH + "{token}", unsubscribe)
