"""Sockets follow their token (issue 24, point 6).

Promises checked, on both socket kinds (`/ws/notifications/…` and `/ws/chat/…`):
- a socket is closed with 4001 "token expired" once its token's `exp` (plus JWT_LEEWAY,
  0 here) has passed, whichever way the token came (header, subprotocol, `?token=`);
- a `refresh` frame with a fresh token of the same identity keeps it open past the first
  expiry, is answered `refreshed`, and the socket then closes at the new expiry;
- a refresh naming another user, tenant or role closes the socket with 4001; one that does
  not verify (garbage, expired, missing) is answered with an error frame and changes
  nothing: the socket still closes at its old deadline;
- `token_expiring` arrives before the close, so a client knows to refresh.

Waits are on the close frame with a generous bound; the only timing asserted is the
promise itself: a refreshed socket is still open after its first token expired, and is
not closed before its new token expires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import jwt
import orjson
import pytest

from notifyd.app import Daemon
from notifyd.auth.identity import Identity
from notifyd.http.websockets import SocketToken, TokenClock
from tests.conftest import DaemonFactory
from tests.helpers import Api, token, wait_for

TENANT, USER, OTHER = "TEN-0001", "auth0|42", "bob"
ROOM = "panel-7"
KINDS = ("notifications", "chat")


@pytest.fixture
async def strict(daemon_factory: DaemonFactory) -> Daemon:
    """A daemon with no leeway on expiry (and no early warning unless a test asks), and a
    group room the user is a member of."""
    daemon = await daemon_factory(JWT_LEEWAY="0", NOTIFYD_WS_TOKEN_WARNING="0")
    await make_room(daemon)
    return daemon


async def make_room(daemon: Daemon) -> None:
    async with Api(daemon) as api:
        status, body, _ = await api.post(
            "/rooms/", {"name": ROOM, "members": [OTHER]}, tenant=TENANT, user=USER
        )
    assert status == 201, body


def path_of(kind: str) -> str:
    return f"/ws/notifications/{TENANT}/{USER}/" if kind == "notifications" else f"/ws/chat/{ROOM}/"


def expiry(bearer: str) -> float:
    """The token's `exp` (the daemon's deadline, with JWT_LEEWAY 0)."""
    return float(jwt.decode(bearer, options={"verify_signature": False})["exp"])


def open_socket(
    session: aiohttp.ClientSession, daemon: Daemon, kind: str, bearer: str, how: str = "header"
) -> Any:
    url = f"ws://127.0.0.1:{daemon.port}{path_of(kind)}"
    if how == "header":
        return session.ws_connect(url, headers={"Authorization": f"Bearer {bearer}"})
    if how == "subprotocol":
        return session.ws_connect(url, protocols=("bearer", bearer))
    return session.ws_connect(f"{url}?token={bearer}")


async def opened(ws: aiohttp.ClientWebSocketResponse, kind: str) -> None:
    """Past the socket's first frame, so the server is serving it (not refusing it)."""
    first = "unread_count" if kind == "notifications" else "presence"
    await next_of_type(ws, first)


async def next_of_type(ws: aiohttp.ClientWebSocketResponse, kind: str) -> Any:
    while True:
        message = await ws.receive(timeout=15)
        assert message.type == aiohttp.WSMsgType.TEXT, (message, ws.close_code)
        event = orjson.loads(message.data)
        if event["type"] == kind:
            return event


async def closed(ws: aiohttp.ClientWebSocketResponse, within: float = 15) -> tuple[int, str]:
    """(code, reason) of the server's close frame, skipping any frames before it."""
    async with asyncio.timeout(within):
        while True:
            message = await ws.receive()
            if message.type == aiohttp.WSMsgType.CLOSE:
                return int(message.data), str(message.extra)
            assert message.type == aiohttp.WSMsgType.TEXT, (message, ws.close_code)


async def still_open(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_json({"type": "ping"})
    assert await next_of_type(ws, "pong") == {"type": "pong"}


async def until(moment: float) -> None:
    """Waits until the wall clock reaches `moment` (the condition is the time itself)."""
    await asyncio.sleep(max(0.0, moment - time.time()))


@pytest.mark.parametrize("how", ["header", "subprotocol", "query"])
@pytest.mark.parametrize("kind", KINDS)
async def test_a_socket_is_closed_with_4001_when_its_token_expires(
    strict: Daemon, session: aiohttp.ClientSession, kind: str, how: str
) -> None:
    bearer = token(strict.settings, TENANT, USER, ttl=2)
    async with open_socket(session, strict, kind, bearer, how) as ws:
        await opened(ws, kind)
        assert await closed(ws) == (4001, "token expired")
        assert time.time() >= expiry(bearer)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refresh_keeps_the_socket_open_until_the_new_token_expires(
    strict: Daemon, session: aiohttp.ClientSession, kind: str
) -> None:
    first = token(strict.settings, TENANT, USER, ttl=2)
    fresh = token(strict.settings, TENANT, USER, ttl=5)
    async with open_socket(session, strict, kind, first) as ws:
        await opened(ws, kind)
        await ws.send_json({"type": "refresh", "token": fresh})
        refreshed = await next_of_type(ws, "refreshed")
        assert datetime.fromisoformat(refreshed["expires_at"]).timestamp() == expiry(fresh)
        assert 0 < refreshed["expires_in"] <= 5
        await until(expiry(first) + 0.5)
        await still_open(ws)
        assert await closed(ws) == (4001, "token expired")
        assert time.time() >= expiry(fresh)


@pytest.mark.parametrize(
    ("tenant", "user", "role"),
    [(TENANT, OTHER, "user"), ("TEN-OTHER", USER, "user"), (TENANT, USER, "admin")],
    ids=["another-user", "another-tenant", "another-role"],
)
@pytest.mark.parametrize("kind", KINDS)
async def test_a_refresh_naming_another_identity_closes_the_socket(
    strict: Daemon, session: aiohttp.ClientSession, kind: str, tenant: str, user: str, role: str
) -> None:
    async with open_socket(session, strict, kind, token(strict.settings, TENANT, USER)) as ws:
        await opened(ws, kind)
        foreign = token(strict.settings, tenant, user, role=role, ttl=3600)
        await ws.send_json({"type": "refresh", "token": foreign})
        assert await closed(ws) == (4001, "refresh token names another identity")


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refresh_that_does_not_verify_changes_nothing(
    strict: Daemon, session: aiohttp.ClientSession, kind: str
) -> None:
    bearer = token(strict.settings, TENANT, USER, ttl=3)
    s = strict.settings
    forged = jwt.encode(
        {s.jwt_tenant_claim: TENANT, s.jwt_user_claim: USER, "exp": int(time.time()) + 3600},
        "a key that is not the daemon's secret, long enough",
        algorithm="HS256",
    )
    refusals = [
        ({"type": "refresh", "token": "garbage"}, "malformed"),
        ({"type": "refresh", "token": forged}, "signature"),
        ({"type": "refresh", "token": token(strict.settings, TENANT, USER, ttl=-60)}, "expired"),
        ({"type": "refresh"}, "token:"),
    ]
    async with open_socket(session, strict, kind, bearer) as ws:
        await opened(ws, kind)
        for frame, expected in refusals:
            await ws.send_json(frame)
            error = await next_of_type(ws, "error")
            assert error["code"] == "refresh_refused"
            assert expected in error["detail"], (frame, error)
        await still_open(ws)
        assert await closed(ws) == (4001, "token expired")  # at the old deadline


@pytest.mark.parametrize("kind", KINDS)
async def test_a_socket_is_told_its_token_is_expiring_before_it_is_closed(
    daemon_factory: DaemonFactory, session: aiohttp.ClientSession, kind: str
) -> None:
    daemon = await daemon_factory(JWT_LEEWAY="0", NOTIFYD_WS_TOKEN_WARNING="1")
    await make_room(daemon)
    # 5 s: the warning has a whole second of the token clock of its own before the deadline
    # even when a loaded machine takes a few seconds to open the socket (with less than two
    # seconds left at the open, warning and close share a second, and the close wins)
    bearer = token(daemon.settings, TENANT, USER, ttl=5)
    async with open_socket(session, daemon, kind, bearer) as ws:
        await opened(ws, kind)
        warning = await next_of_type(ws, "token_expiring")
        assert 0 <= warning["expires_in"] <= 1
        assert time.time() < expiry(bearer)
        assert await closed(ws) == (4001, "token expired")


class _Owner:
    """A socket's side of its token, for the clock's tests: what each moment does."""

    def __init__(self, expired: Callable[[], object], expiring: Callable[[], object]) -> None:
        self._expired = expired
        self._expiring = expiring

    def token_expired(self) -> None:
        self._expired()

    def token_expiring(self, seconds_left: float) -> None:
        self._expiring()


async def test_one_token_clock_closes_every_socket_at_its_deadline_never_before() -> None:
    """Promise: every open socket's deadline is kept by one process-wide timer (a timer per
    socket cost memory per idle connection): each socket still closing at its own deadline,
    never before it, a stopped one never, a renewed one at its new deadline, and nothing
    left on the clock afterwards."""
    clock = TokenClock()
    closed: dict[int, float] = {}
    now = time.time()
    who = Identity("TEN-1", "u", "user")
    tokens = [SocketToken(who, now + 1.0 + (i % 3) * 0.5, 0.0, clock) for i in range(300)]
    for i, tok in enumerate(tokens):
        tok.start(_Owner(lambda i=i: closed.setdefault(i, time.time()), lambda: None))
    stopped = set(range(0, 300, 7))
    for i in stopped:
        tokens[i].stop()
    tokens[1].renew(now + 3.0)
    assert clock._timer is not None  # one timer for all of them
    await wait_for(lambda: len(closed) == 300 - len(stopped))
    assert set(closed) == set(range(300)) - stopped
    assert all(closed[i] >= tokens[i].expires_at for i in closed)
    assert closed[1] >= now + 3.0
    assert len(clock) == 0 and clock._timer is None


async def test_the_token_clock_warns_once_before_the_deadline() -> None:
    """Promise: the warning comes before the close, once, and a token that is renewed
    after its warning is warned again before its new deadline."""
    clock = TokenClock()
    events: list[str] = []
    tok = SocketToken(Identity("TEN-1", "u", "user"), time.time() + 2.0, 30.0, clock)
    tok.start(_Owner(lambda: events.append("closed"), lambda: events.append("warned")))
    await wait_for(lambda: "closed" in events)
    assert events == ["warned", "closed"]
