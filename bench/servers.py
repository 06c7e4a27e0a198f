"""The bare servers of `limits` and the SMTP sink, each in a process of its own.

`python -m bench.servers http|ws|smtp [--port N] [...]` binds 127.0.0.1, prints
`ready <port>` on stdout, and runs until its stdin closes (the harness closing the pipe, or
dying) or SIGTERM. No notifyd code is imported here: these are the ceilings, the same work
with nothing of notifyd in the path. They run in their own process so that, like a real
notifyd, they do not share the load generator's event loop.

- `http`: `POST /notifications/send/` → 202 with a small JSON body, after reading the request
  body; nothing else.
- `ws`: the chat protocol's frame shapes with nothing behind them. `POST /rooms/` keeps a
  room in a dict; `/ws/chat/<room>/` sends `presence`, tells the others `join`/`leave`, and
  a `{"message": …}` frame is encoded once and sent to every member's socket, the sender's
  too. The user is read from the token's claims without verifying it (`--user-claim`).
  `--drop-every N` skips every Nth delivery, so a test can check that the client counts
  losses exactly.
- `smtp`: an aiosmtpd sink; for every message it accepts it prints
  `m <CLOCK_MONOTONIC ns> <token>` (the `[bench:<token>]` in the subject, `-` when none),
  so the harness counts what arrived, when, and how often. `--refuse-every N` answers 550 to
  every Nth message, so a test can check that the harness counts what never arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import WSMsgType, web

READY = "ready"
TOKEN_IN_SUBJECT = re.compile(rb"\[bench:([A-Za-z0-9_.:-]{1,200})\]")
GROUP_NAME = re.compile(r"[A-Za-z0-9_-]{1,100}")
ACCEPTED = b'{"notification_id":"00000000-0000-7000-8000-000000000000","status":"queued"}'


# --------------------------------------------------------------------------- http


async def _accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202, body=ACCEPTED, content_type="application/json")


def http_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/notifications/send/", _accept)
    return app


# --------------------------------------------------------------------------- ws


def _unverified_claims(token: str) -> dict[str, Any]:
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


class FanOut:
    """Rooms, their members and their open sockets; one process, no persistence."""

    def __init__(self, user_claim: str, drop_every: int) -> None:
        self.user_claim = user_claim
        self.drop_every = drop_every
        self.members: dict[str, set[str]] = {}
        self.sockets: dict[str, dict[web.WebSocketResponse, str]] = {}
        self._deliveries = itertools.count(1)
        self._offsets = itertools.count(1)
        self._names = itertools.count(1)

    def user(self, request: web.Request) -> str | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else request.query.get("token", "")
        user = _unverified_claims(token).get(self.user_claim) if token else None
        return user if isinstance(user, str) and user else None

    async def create_room(self, request: web.Request) -> web.Response:
        user = self.user(request)
        if user is None:
            return web.json_response({"detail": "send a bearer token"}, status=401)
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response({"detail": "body must be JSON"}, status=400)
        name = body.get("name") or f"room-{next(self._names)}"
        members = body.get("members") or []
        if not isinstance(name, str) or not GROUP_NAME.fullmatch(name):
            return web.json_response({"detail": "name"}, status=422)
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            return web.json_response({"detail": "members"}, status=422)
        if name in self.members:
            return web.json_response({"detail": "room exists"}, status=409)
        self.members[name] = {*members, user}
        self.sockets[name] = {}
        return web.json_response(
            {
                "name": name,
                "kind": "group",
                "members": sorted(self.members[name]),
                "created_by": user,
            },
            status=201,
        )

    async def _broadcast(
        self, room: str, payload: str, *, skip: web.WebSocketResponse | None, message: bool
    ) -> None:
        for ws in list(self.sockets.get(room, {})):
            if ws is skip or ws.closed:
                continue
            if message and self.drop_every and next(self._deliveries) % self.drop_every == 0:
                continue
            try:
                await ws.send_str(payload)
            except ConnectionError:
                continue

    async def chat(self, request: web.Request) -> web.StreamResponse:
        room = request.match_info["room"]
        user = self.user(request)
        ws = web.WebSocketResponse(max_msg_size=65_536)
        await ws.prepare(request)
        if user is None:
            await ws.close(code=4001, message=b"send a bearer token")
            return ws
        if room not in self.members:
            await ws.close(code=4004, message=b"no such room")
            return ws
        if user not in self.members[room]:
            await ws.close(code=4003, message=b"not a member")
            return ws
        sockets = self.sockets[room]
        online = sorted({*sockets.values(), user})
        await ws.send_str(
            orjson.dumps({"type": "presence", "room": room, "online": online}).decode()
        )
        join = orjson.dumps({"type": "join", "room": room, "user_id": user}).decode()
        await self._broadcast(room, join, skip=ws, message=False)
        sockets[ws] = user
        try:
            async for frame in ws:
                if frame.type == WSMsgType.TEXT:
                    await self._on_frame(room, user, frame.data)
        finally:
            sockets.pop(ws, None)
            leave = orjson.dumps({"type": "leave", "room": room, "user_id": user}).decode()
            await self._broadcast(room, leave, skip=ws, message=False)
        return ws

    async def _on_frame(self, room: str, user: str, data: str) -> None:
        try:
            command = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(command, dict) or not isinstance(command.get("message"), str):
            return
        now = time.time()
        event = {
            "type": "message",
            "room": room,
            "id": str(uuid.uuid4()),
            "sender_id": user,
            "receiver_id": None,
            "message": command["message"],
            "sent_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "offset": f"{int(now * 1000)}-{next(self._offsets)}",
            "client_id": command.get("client_id"),
        }
        payload = orjson.dumps(event).decode()  # encoded once, sent to every member
        await self._broadcast(room, payload, skip=None, message=True)


def ws_app(user_claim: str, drop_every: int) -> web.Application:
    fan_out = FanOut(user_claim, drop_every)
    app = web.Application()
    app.router.add_post("/rooms/", fan_out.create_room)
    app.router.add_get("/ws/chat/{room}/", fan_out.chat)
    return app


# --------------------------------------------------------------------------- smtp


class _Sink:
    def __init__(self, refuse_every: int) -> None:
        self._refuse_every = refuse_every
        self._count = itertools.count(1)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        now = time.monotonic_ns()
        if self._refuse_every and next(self._count) % self._refuse_every == 0:
            return "550 5.7.1 refused by the benchmark sink"
        found = TOKEN_IN_SUBJECT.search(envelope.content)
        token = found.group(1).decode() if found else "-"
        sys.stdout.write(f"m {now} {token}\n")
        sys.stdout.flush()
        return "250 Message accepted for delivery"


async def _serve_smtp(port: int, refuse_every: int) -> asyncio.Server:
    from aiosmtpd.smtp import SMTP

    handler = _Sink(refuse_every)
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: SMTP(handler, hostname="127.0.0.1", data_size_limit=1 << 20),
        "127.0.0.1",
        port,
    )


# --------------------------------------------------------------------------- running


def _stop_event() -> asyncio.Event:
    """Set on SIGTERM/SIGINT or when stdin reaches EOF (the harness is done or gone)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_stdin() -> None:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    return stop


async def _run_app(app: web.Application, port: int) -> None:
    stop = _stop_event()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    sys.stdout.write(f"{READY} {bound}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


async def _run_smtp(port: int, refuse_every: int) -> None:
    stop = _stop_event()
    server = await _serve_smtp(port, refuse_every)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{READY} {bound}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.servers", description=__doc__)
    parser.add_argument("kind", choices=("http", "ws", "smtp"))
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--user-claim", default="user_id", help="ws: the claim naming the user")
    parser.add_argument("--drop-every", type=int, default=0, help="ws: skip every Nth delivery")
    parser.add_argument(
        "--refuse-every", type=int, default=0, help="smtp: answer 550 to every Nth message"
    )
    args = parser.parse_args(argv)
    if args.kind == "http":
        coro = _run_app(http_app(), args.port)
    elif args.kind == "ws":
        coro = _run_app(ws_app(args.user_claim, args.drop_every), args.port)
    else:
        coro = _run_smtp(args.port, args.refuse_every)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a notifyd dependency
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
