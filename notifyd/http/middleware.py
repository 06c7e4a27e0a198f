"""Request edge: CORS, request ids, logging, metrics, problem+json for every error, and auth.

Order matters and is fixed in `server.build_app`: CORS wraps everything (so a refusal, a 401
or a 503 reaches a host page on an allowed origin as the readable problem it is, not as an
opaque network error), the edge next (so even an auth failure or an unknown route is logged,
counted and answered as problem+json), auth runs last.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable

import asyncpg
import redis.exceptions
from aiohttp import web

from notifyd.auth.tokens import TokenError
from notifyd.http import problems
from notifyd.http.context import IDENTITY_KEY, REQUEST_ID_KEY, services
from notifyd.http.problems import Problem
from notifyd.ids import uuid7_hex
from notifyd.logs import request_id_var, tenant_id_var
from notifyd.store.batch import CommitTimeout

log = logging.getLogger("notifyd.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/webhooks/twilio/status"}
)
PUBLIC_PREFIX = "/ui/"  # the web components' files (notifyd.http.ui): code, no data
# one-click unsubscribe: the signed token in the path is the credential (http/unsubscribe.py)
UNSUBSCRIBE_PREFIX = "/unsubscribe/"
# CORS: what the web components call from a host page on another origin (the files under
# /ui/, the notification center and the chat's REST routes), for NOTIFYD_ALLOWED_ORIGINS only
CORS_PREFIXES = (
    "/notifications/",
    "/messages/",
    "/rooms/",
    "/api/notifications/",
    "/api/messages/",
    "/api/rooms/",
    PUBLIC_PREFIX,
)
CORS_PREFLIGHT = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Idempotency-Key, X-Request-ID",
    "Access-Control-Max-Age": "600",
}
CORS_EXPOSED = "Link, X-Unread-Count, X-Request-ID, Retry-After, Location, ETag"
# a client may send any token as its method: metric labels take these, the rest is "other"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_GOOD_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# PostgreSQL or Redis did not answer in time (every wait has a deadline: a pool checkout, a
# statement, a Redis command, a group commit) or could not be reached: the service is
# unavailable for now, not broken. 503 with Retry-After, and one log line, no traceback.
UNAVAILABLE = (
    TimeoutError,  # asyncio's, asyncpg's statement and checkout timeouts, CommitTimeout
    ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
)
RETRY_AFTER_S = "2"


def route_name(request: web.Request) -> str:
    """The route template (`/notifications/{id}/`), never the raw path: bounded label values."""
    info = request.match_info
    if info.http_exception is not None or info.route.resource is None:
        return "unmatched"
    return info.route.resource.canonical


def _as_problem(exc: web.HTTPException) -> Problem:
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    details = {
        404: "no such route",
        405: f"method {exc.reason} not allowed here",
        413: "the request body is larger than the limit",
    }
    detail = details.get(exc.status, exc.text or exc.reason)
    if exc.status == 405:
        detail = f"this route does not accept that method (allowed: {headers.get('Allow', '')})"
    kinds = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}
    return Problem(exc.status, detail, kind=kinds.get(exc.status), headers=headers)


def _unavailable(exc: BaseException) -> Problem:
    if isinstance(exc, CommitTimeout):
        detail = (
            "the database did not commit in time; the notification was not accepted"
            if not exc.written
            else "the database did not commit in time; the notification was not accepted, "
            "but may still be stored and sent (send with an Idempotency-Key to retry safely)"
        )
    else:
        detail = "a database or Redis did not answer in time; retry later"
    return Problem(503, detail, kind="unavailable", headers={"Retry-After": RETRY_AFTER_S})


@web.middleware
def cors_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """CORS for an `Origin` in NOTIFYD_ALLOWED_ORIGINS on the routes the components use:
    preflights answered here, other answers given the headers. Every other origin, and
    every other route, gets no CORS header at all (so a browser keeps the answer from the
    page); requests without an Origin (servers, same-origin GETs) pass untouched."""
    origin = request.headers.get("Origin")
    if (
        origin is None
        or not request.path.startswith(CORS_PREFIXES)
        or origin not in services(request).settings.allowed_origins
    ):
        return handler(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin", **CORS_PREFLIGHT}
        return _answered(web.Response(status=204, headers=headers))
    return _with_cors(request, handler, origin)


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


async def _with_cors(request: web.Request, handler: Handler, origin: str) -> web.StreamResponse:
    response = await handler(request)
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
    if "origin" not in response.headers.get("Vary", "").lower():
        response.headers.add("Vary", "Origin")
    return response


def _request_id(request: web.Request) -> str:
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if _GOOD_REQUEST_ID.fullmatch(incoming) else uuid7_hex()
    request[REQUEST_ID_KEY] = rid
    return rid


@web.middleware
def edge_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    if request.path.startswith("/ws/") and request.match_info.http_exception is None:
        # A WebSocket is not a request that ends in a moment: it is counted and logged by
        # its own endpoint (notifyd_ws_connections), and nothing of ours waits under it for
        # hours (memory times every open socket). Its task is its own: the ids set here
        # stay with it.
        request_id_var.set(_request_id(request))
        return handler(request)
    return _edge(request, handler)


async def _edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = _request_id(request)
    rid_token = request_id_var.set(rid)
    tenant_token = tenant_id_var.set(None)
    metrics = services(request).metrics
    started = time.perf_counter()
    metrics.http_in_flight.inc()
    response: web.StreamResponse
    try:
        try:
            response = await handler(request)
        except Problem as problem:
            response = problems.response(problem, rid)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = problems.response(_as_problem(exc), rid)
        except UNAVAILABLE as exc:
            log.warning("dependency unavailable", extra={"path": request.path, "error": repr(exc)})
            response = problems.response(_unavailable(exc), rid)
        except Exception:
            log.exception("unhandled error", extra={"path": request.path})
            response = problems.response(
                Problem(500, "internal error; quote the request id when reporting it"), rid
            )
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        elapsed = time.perf_counter() - started
        metrics.http_in_flight.dec()
        route = route_name(request)
        status = locals().get("response")
        code = status.status if isinstance(status, web.StreamResponse) else 500
        method = request.method if request.method in KNOWN_METHODS else "other"
        metrics.request_answered(route, method, code, elapsed)
        if route != "/metrics" and log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "route": route,
                    "status": code,
                    "ms": round(elapsed * 1000, 2),
                },
            )
        tenant_id_var.reset(tenant_token)
        request_id_var.reset(rid_token)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


_UNSAFE_IN_QUOTES = re.compile(r'[^\x20-\x7e]|["\\]')


def _unauthorized(detail: str, error: str = "invalid_token") -> Problem:
    challenge = 'Bearer realm="notifyd"'
    if error:
        # the detail may quote the token's own header: keep it a valid quoted-string
        description = _UNSAFE_IN_QUOTES.sub("", detail)[:200]
        challenge += f', error="{error}", error_description="{description}"'
    return Problem(401, detail, kind="unauthorized", headers={"WWW-Authenticate": challenge})


@web.middleware
def auth_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    # unknown routes and methods answer 404/405 whoever asks; public routes need no token
    # WebSocket routes authenticate themselves after the upgrade (header, subprotocol or
    # ?token=), so a browser sees a close code and reason rather than a refused handshake.
    # Those are handed on as they are, not awaited here: a socket lives for hours, and a
    # frame of ours kept suspended under each one is memory times every open socket.
    if (
        request.match_info.http_exception is not None
        or request.path in PUBLIC_PATHS
        or request.path.startswith(("/ws/", PUBLIC_PREFIX, UNSUBSCRIBE_PREFIX))
    ):
        return handler(request)
    return _authenticated(request, handler)


async def _authenticated(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = _bearer(request)
    if token is None:
        raise _unauthorized("send Authorization: Bearer <token>", error="")
    try:
        caller = await services(request).verifier.verify(token)
    except TokenError as exc:
        if exc.error == "temporarily_unavailable":
            # our problem, not the caller's: the signing keys cannot be fetched right now
            raise Problem(
                503, exc.reason, kind="keys-unavailable", headers={"Retry-After": "5"}
            ) from None
        raise _unauthorized(exc.reason, exc.error) from None
    request[IDENTITY_KEY] = caller
    tenant_id_var.set(caller.tenant_id)
    return await handler(request)
