"""`Idempotency-Key` on POST: the first response is replayed for the key's lifetime.

The key is scoped to tenant and caller; the request is fingerprinted by method, path and body,
so reusing a key for a different request is a client bug answered with 422, and a duplicate
arriving while the first is still running gets 409 instead of running twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Awaitable
from dataclasses import dataclass

from aiohttp import web

from notifyd.http.context import IDENTITY_KEY, services
from notifyd.http.middleware import Handler
from notifyd.http.problems import Problem
from notifyd.store import idempotency as store
from notifyd.store.pool import Conn, Executor

log = logging.getLogger("notifyd.http.idempotency")

HEADER = "Idempotency-Key"
KEY = re.compile(r"[\x21-\x7e]{1,255}")
"""An Idempotency-Key: 1-255 visible ASCII characters (/openapi.json shows this pattern)."""
_REPLAYED_HEADERS = ("Content-Type", "Location")
_EXEMPT: set[object] = set()
"""Handlers whose answer must not be stored (it holds a secret shown once): the key is
ignored there, and each request runs as if it had none."""


def exempt(handler: Handler) -> Handler:
    """Mark a route's handler as one whose answers are never recorded (see `_EXEMPT`)."""
    _EXEMPT.add(handler)
    return handler


def _fingerprint(request: web.Request, body: bytes) -> bytes:
    digest = hashlib.sha256()
    digest.update(request.method.encode())
    digest.update(b"\0")
    digest.update(request.path.encode())
    digest.update(b"\0")
    digest.update(body)
    return digest.digest()


@web.middleware
def idempotency_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    # without a key the handler is handed on, not awaited here (as in auth_middleware)
    if (
        HEADER not in request.headers
        or request.method != "POST"
        or IDENTITY_KEY not in request
        or request.match_info.handler in _EXEMPT
    ):
        return handler(request)
    return _idempotent(request, handler)


async def _idempotent(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.headers[HEADER]
    caller = request[IDENTITY_KEY]
    if not KEY.fullmatch(key):
        raise Problem(
            400, f"{HEADER} must be 1-255 visible ASCII characters", kind="bad-idempotency-key"
        )
    ctx = services(request)
    body = await request.read()
    scope = store.Scope(caller.tenant_id, caller.user_id, key)
    fingerprint = _fingerprint(request, body)
    earlier = await store.claim(
        ctx.pool,
        scope,
        fingerprint,
        ctx.settings.idempotency_ttl,
        ctx.settings.idempotency_stale_after,
    )
    if earlier is not None:
        if earlier.request_hash != fingerprint:
            raise Problem(
                422,
                f"this {HEADER} was used with a different request; use a new key",
                kind="idempotency-key-reused",
            )
        if not earlier.completed:
            raise Problem(
                409,
                f"a request with this {HEADER} is still in progress; retry shortly",
                kind="idempotency-in-progress",
                headers={"Retry-After": "1"},
            )
        assert earlier.status_code is not None
        replay = web.Response(status=earlier.status_code, body=earlier.body or b"")
        for name, value in (earlier.headers or {}).items():
            replay.headers[name] = value
        replay.headers["Idempotent-Replayed"] = "true"
        return replay

    pending = PendingKey(scope)
    request[PENDING_KEY] = pending
    try:
        response = await handler(request)
    except BaseException:
        # releases only an unfinished claim: a response recorded with a committed write stays
        await store.release(ctx.pool, scope)
        raise
    if response.status >= 500 or not isinstance(response, web.Response):
        await store.release(ctx.pool, scope)
        return response
    if not pending.recorded:  # a handler that writes nothing records its answer here
        await _record(ctx.pool, scope, response)
    return response


@dataclass
class PendingKey:
    """The claimed key of the request in progress, for `remember`."""

    scope: store.Scope
    recorded: bool = False


PENDING_KEY = web.RequestKey("idempotency_pending", PendingKey)


async def _record(executor: Executor, scope: store.Scope, response: web.Response) -> None:
    stored_body = response.body if isinstance(response.body, bytes) else b""
    headers = {n: response.headers[n] for n in _REPLAYED_HEADERS if n in response.headers}
    await store.complete(executor, scope, response.status, headers, stored_body)


async def remember(request: web.Request, conn: Conn, response: web.Response) -> web.Response:
    """Record `response` for the request's Idempotency-Key inside the write's transaction.

    A write and its recorded answer then commit together: a crash after the commit cannot
    leave the key unfinished, so a retry replays the first answer instead of writing twice.
    Without a key this does nothing.
    """
    pending: PendingKey | None = request.get(PENDING_KEY)
    if pending is not None:
        await _record(conn, pending.scope, response)
        pending.recorded = True
    return response
