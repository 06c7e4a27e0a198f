"""`ws_fanout`: R rooms x M members on WebSockets; S messages per sender, every member hears
every message. How many deliveries per second, how late, are any lost?

The run, against notifyd's chat endpoint (or the bare fan-out server of `limits`, which
speaks the same frames):

1. Rooms: `POST /rooms/` with the first member's token, `{"name": "bench-<run>-<r>",
   "members": [the others]}` → 201, for R rooms of a tenant of this run only
   (`bench-<run>`), users `bench-<run>-r<r>-m<m>`, each with a `user` token of its own.
2. Connect every member to `/ws/chat/<room>/` (`Authorization: Bearer`), at most
   `--connect-concurrency` at a time; a socket is set up when its first frame, `presence`,
   has arrived → `setup_per_s` (sockets set up per second, rooms already made).
3. Send: the first `--senders` members of each room (default: all) each send S frames
   `{"message": "<run> <sender> <seq> <CLOCK_MONOTONIC ns> xxx…", "client_id": …}`, as fast
   as the socket takes them (burst, `--rate 0`) or paced so deliveries arrive at `--rate`
   per second (a message to M members is M deliveries).
4. Receive: every member counts `message` frames of this run by (sender, seq); the latency
   of a delivery is its arrival minus the time in its text (one clock: every socket is in
   this process). The wait ends when every expected delivery arrived, or `--drain` seconds
   after the last send.

Figures: `delivered_per_s` = unique deliveries ÷ (last arrival - first send);
`lost` = messages sent x members - unique deliveries; `duplicates`; `p50_ms`/`p99_ms`/`max_ms`
of the delivery latency; `errors` (`error` frames, e.g. the daemon's rate limit) and
`closed_early` (sockets the server closed during the run).

notifyd limits the frames a connection may send (`NOTIFYD_WS_MESSAGE_RATE` per second,
`NOTIFYD_WS_MESSAGE_BURST`): start the daemon under test with limits far above S and the
rate, or the burst measures the limiter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench.common import (
    DEFAULT_URL,
    BenchError,
    TokenMinter,
    add_env_argument,
    add_url_argument,
    all_or_none,
    log,
    machine,
    options_of,
    percentile,
    raise_nofile_limit,
    require_loopback_url,
)

REQUEST_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 30.0
CLOSE_BOUND_S = 10.0
MAX_FRAME = 1 << 20


@dataclass(slots=True)
class FanoutOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    rooms: int = 10
    members: int = 10
    messages: int = 10  # per sender
    senders: int = 0  # per room; 0: every member
    rate: float = 0.0  # deliveries per second; 0: burst
    size: int = 64  # bytes of message text
    connect_concurrency: int = 64
    drain: float = 10.0
    quiet: bool = False
    also_urls: tuple[str, ...] = ()  # more notifyd processes: sockets spread over all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint each member's token")
    parser.add_argument(
        "--also-url",
        action="append",
        default=[],
        metavar="URL",
        help="another notifyd process of the same deployment (repeatable): the sockets are "
        "spread over all of them in turn, so every room's members sit on several processes "
        "and each message crosses between them through Redis",
    )
    add_shape_arguments(parser)
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="deliveries per second to pace the sends at (default 0: burst)",
    )


def add_shape_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Rooms, members, messages: shared with `limits`, which loads its bare server alike."""
    parser.add_argument(f"--{prefix}rooms", type=int, default=10, help="rooms (R)")
    parser.add_argument(f"--{prefix}members", type=int, default=10, help="members per room (M)")
    parser.add_argument(f"--{prefix}messages", type=int, default=10, help="messages per sender (S)")
    parser.add_argument(
        f"--{prefix}senders", type=int, default=0, help="senders per room (default 0: all)"
    )
    parser.add_argument(f"--{prefix}size", type=int, default=64, help="bytes of message text")
    parser.add_argument(
        f"--{prefix}connect-concurrency",
        type=int,
        default=64,
        help="sockets opened at a time",
    )
    parser.add_argument(
        f"--{prefix}drain",
        type=float,
        default=10.0,
        help="seconds to wait for deliveries after the last send",
    )


def options_from(args: argparse.Namespace) -> FanoutOptions:
    return options_of(FanoutOptions, args, also_urls=tuple(args.also_url))


@dataclass(slots=True)
class _Tally:
    """What every socket heard, in one place (one event loop: no locks)."""

    expected: int = 0
    unique: int = 0
    duplicates: int = 0
    errors: int = 0
    first_error: str | None = None
    closed_early: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    last_arrival_ns: int = 0
    running: bool = True
    complete: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Member:
    room: int
    index: int
    user: str
    token: str
    ws: aiohttp.ClientWebSocketResponse | None = None
    reader: asyncio.Task[None] | None = None
    heard: set[tuple[str, int]] = field(default_factory=set)


def _room_name(run_id: str, room: int) -> str:
    return f"bench-{run_id}-{room}"


async def _create_rooms(
    session: aiohttp.ClientSession, base: str, run_id: str, members: list[list[_Member]]
) -> None:
    async def create(room: int) -> None:
        owner = members[room][0]
        payload = {
            "name": _room_name(run_id, room),
            "members": [m.user for m in members[room][1:]],
        }
        async with session.post(
            base + "/rooms/",
            data=orjson.dumps(payload),
            headers={"Authorization": f"Bearer {owner.token}", "Content-Type": "application/json"},
        ) as response:
            text = await response.text()
            if response.status != 201:
                raise BenchError(f"POST /rooms/ answered {response.status}: {text[:300]}")

    try:
        await all_or_none(create(r) for r in range(len(members)))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"POST /rooms/ failed: {exc or type(exc).__name__}") from None


async def _read(member: _Member, tally: _Tally, run_id: str) -> None:
    """Count this member's deliveries of the run until the socket closes."""
    assert member.ws is not None
    marker = f"{run_id} "
    async for frame in member.ws:
        if frame.type != aiohttp.WSMsgType.TEXT:
            continue
        now = time.monotonic_ns()
        try:
            event = orjson.loads(frame.data)
        except orjson.JSONDecodeError:
            continue
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "message":
            text = event.get("message")
            if not isinstance(text, str) or not text.startswith(marker):
                continue
            _, sender, seq, sent_ns, _ = text.split(" ", 4)
            key = (sender, int(seq))
            if key in member.heard:
                tally.duplicates += 1
                continue
            member.heard.add(key)
            tally.unique += 1
            tally.latencies_ms.append((now - int(sent_ns)) / 1e6)
            tally.last_arrival_ns = now
            if tally.unique >= tally.expected:
                tally.complete.set()
        elif kind == "error":
            tally.errors += 1
            if tally.first_error is None:
                tally.first_error = str(event.get("detail") or event)[:200]
    if tally.running:
        tally.closed_early += 1
        code = str(member.ws.close_code)
        tally.close_codes[code] = tally.close_codes.get(code, 0) + 1


async def _connect(
    session: aiohttp.ClientSession, base: str, run_id: str, member: _Member, tally: _Tally
) -> None:
    url = base + f"/ws/chat/{_room_name(run_id, member.room)}/"
    try:
        ws = await session.ws_connect(
            url,
            headers={"Authorization": f"Bearer {member.token}"},
            max_msg_size=MAX_FRAME,
            autoping=True,
        )
        first = await ws.receive(timeout=CONNECT_TIMEOUT_S)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"/ws/chat/: connecting failed: {exc or type(exc).__name__}") from None
    if first.type != aiohttp.WSMsgType.TEXT:
        await ws.close()
        raise BenchError(
            f"/ws/chat/: the first frame was {first.type.name} "
            f"(close code {ws.close_code}: {first.extra!r}), not presence"
        )
    hello = orjson.loads(first.data)
    if not isinstance(hello, dict) or hello.get("type") != "presence":
        await ws.close()
        raise BenchError(f"/ws/chat/: the first frame was not presence: {first.data[:200]}")
    member.ws = ws
    member.reader = asyncio.create_task(_read(member, tally, run_id), name="ws-fanout-reader")


async def _send(
    member: _Member,
    run_id: str,
    count: int,
    size: int,
    schedule: tuple[float, float] | None,
) -> int:
    """Send `count` messages; `schedule` = (start, interval) on the monotonic clock paces
    them. Returns how many were sent."""
    assert member.ws is not None
    sent = 0
    for seq in range(count):
        if schedule is not None:
            delay = schedule[0] + seq * schedule[1] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        head = f"{run_id} {member.user} {seq} {time.monotonic_ns()} "
        text = head + "x" * max(0, size - len(head))
        try:
            await member.ws.send_str(
                orjson.dumps({"message": text, "client_id": f"{member.user}:{seq}"}).decode()
            )
        except (ConnectionError, RuntimeError):
            break  # the server closed this socket; its losses show in `lost`
        sent += 1
    return sent


async def main(options: FanoutOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if min(o.rooms, o.members, o.messages, o.connect_concurrency) < 1 or o.members < 2:
        raise BenchError("--rooms, --messages need 1 or more, --members 2 or more")
    if o.rate < 0 or o.senders < 0 or o.senders > o.members or o.drain < 0:
        raise BenchError("--rate, --senders (≤ --members) and --drain must not be negative")
    require_loopback_url(o.url, "--url")
    for other in o.also_urls:
        require_loopback_url(other, "--also-url")
    base = o.url.rstrip("/")
    bases = [base, *(other.rstrip("/") for other in o.also_urls)]
    sockets = o.rooms * o.members
    raise_nofile_limit(sockets + 256)
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    senders = o.senders or o.members
    minter = TokenMinter(o.jwt_secret)
    ttl = 3600 + int(o.drain) + o.messages * 10
    members = [
        [
            _Member(r, m, user, minter.mint(tenant_id=tenant, user_id=user, role="user", ttl=ttl))
            for m in range(o.members)
            for user in (f"bench-{run_id}-r{r}-m{m}",)
        ]
        for r in range(o.rooms)
    ]
    everyone = [m for room in members for m in room]
    talkers = [m for room in members for m in room[:senders]]
    tally = _Tally(expected=len(talkers) * o.messages * o.members)
    say = (lambda _m: None) if o.quiet else log
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    try:
        began = time.monotonic()
        await _create_rooms(session, base, run_id, members)
        rooms_s = time.monotonic() - began
        say(f"{o.rooms} rooms made in {rooms_s:.2f} s; connecting {sockets} sockets")
        gate = asyncio.Semaphore(o.connect_concurrency)

        async def connect(member: _Member, url: str) -> None:
            async with gate:
                await _connect(session, url, run_id, member, tally)

        began = time.monotonic()
        # member m of every room on process m mod P: each room spans the processes
        await all_or_none(connect(m, bases[m.index % len(bases)]) for m in everyone)
        setup_s = max(1e-6, time.monotonic() - began)
        mode = "paced" if o.rate > 0 else "burst"
        say(f"{sockets} sockets set up in {setup_s:.2f} s; {mode}: {tally.expected} deliveries")
        first_send_ns = time.monotonic_ns()
        start = time.monotonic()
        schedule: list[tuple[float, float] | None] = [None] * len(talkers)
        if o.rate > 0:
            interval = len(talkers) * o.members / o.rate  # between one sender's messages
            schedule = [
                (start + i * interval / len(talkers), interval) for i in range(len(talkers))
            ]
        sent = await all_or_none(
            _send(m, run_id, o.messages, o.size, when)
            for m, when in zip(talkers, schedule, strict=True)
        )
        last_send_ns = time.monotonic_ns()
        sent_total = sum(sent)
        tally.expected = sent_total * o.members
        if tally.unique >= tally.expected:
            tally.complete.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.complete.wait(), o.drain)
    finally:
        tally.running = False
        await _close_all(everyone)
        await session.close()

    span_s = max(1e-9, (tally.last_arrival_ns - first_send_ns) / 1e9)
    ordered = sorted(tally.latencies_ms)
    return {
        "workload": "ws_fanout",
        "mode": mode,
        "rooms": o.rooms,
        "members": o.members,
        "senders_per_room": senders,
        "messages_per_sender": o.messages,
        "size": o.size,
        "rate": o.rate or None,
        "sockets": sockets,
        "messages_sent": sent_total,
        "expected": sent_total * o.members,
        "delivered": tally.unique,
        "delivered_per_s": round(tally.unique / span_s, 1) if tally.unique else 0.0,
        "sent_per_s": round(sent_total / max(1e-9, (last_send_ns - first_send_ns) / 1e9), 1),
        "lost": sent_total * o.members - tally.unique,
        "duplicates": tally.duplicates,
        "p50_ms": round(percentile(ordered, 0.50), 2) if ordered else None,
        "p99_ms": round(percentile(ordered, 0.99), 2) if ordered else None,
        "max_ms": round(ordered[-1], 2) if ordered else None,
        "setup_per_s": round(sockets / setup_s, 1),
        "setup_s": round(setup_s, 3),
        "rooms_s": round(rooms_s, 3),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "closed_early": tally.closed_early,
        "close_codes": tally.close_codes,
        "run": {"tenant": tenant, "url": o.url, "also_urls": list(o.also_urls)},
        "machine": machine(),
    }


async def _close_all(members: list[_Member]) -> None:
    """Close every socket (bounded): the server's leave frames are no longer counted."""
    gate = asyncio.Semaphore(256)

    async def close(member: _Member) -> None:
        if member.ws is None:
            return
        async with gate:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(member.ws.close(), CLOSE_BOUND_S)
        if member.reader is not None:
            member.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await member.reader

    await asyncio.gather(*(close(m) for m in members))


__all__ = ["FanoutOptions", "add_arguments", "add_shape_arguments", "main", "options_from"]
