"""`connections`: N idle WebSockets held open; how much memory does notifyd spend on each?

Each connection is `/ws/notifications/<tenant>/<user>/` of a user of its own (tenant
`bench-<run>`, users `bench-<run>-c<i>`) with that user's token, opened at most
`--connect-concurrency` at a time; it counts as held once its first frame (`unread_count`)
arrived, i.e. the daemon has subscribed it. The harness then holds them for `--hold`
seconds, answering the daemon's pings and sending its own (`--heartbeat`).

notifyd's process: `--pid`, or found by the port of `--url`: the listening socket's inode in
`/proc/net/tcp` (and `tcp6`), then the process holding `socket:[inode]` among
`/proc/<pid>/fd/*` (needs the right to read that process's fds: the same user, or root).
Its resident memory (`VmRSS` of `/proc/<pid>/status`) is read before the first connection
and at the end of the hold → `rss_kib_per_conn` = (after - before) ÷ held. `server_connections`
is notifyd's own gauge (`notifyd_ws_connections{endpoint="notifications"}` of `/metrics`)
at the end of the hold; `rss_after_close_kib` is read `--settle` seconds after closing.
RSS counts resident pages: memory the daemon freed after earlier work is reused without
growing it, so measure a freshly started daemon (`all` runs this first on the daemon).

Limits: the harness raises its RLIMIT_NOFILE soft limit to the hard limit (one descriptor per
socket); notifyd needs as many (`LimitNOFILE=` under systemd, `ulimit -n` in a shell: its
limit is reported as `daemon_nofile`). Every connection comes from 127.0.0.1 to one port, so
each takes one local port of `net.ipv4.ip_local_port_range` (28,232 by default): 10,000 over
loopback from one client address is fine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

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
    raise_nofile_limit,
    require_loopback_url,
)

CONNECT_TIMEOUT_S = 30.0
CLOSE_BOUND_S = 10.0
LISTEN = "0A"
_GAUGE = re.compile(
    r'^notifyd_ws_connections\{endpoint="notifications"\}\s+([0-9.e+]+)$', re.MULTILINE
)


@dataclass(slots=True)
class ConnectionsOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    count: int = 1000
    hold: float = 10.0
    heartbeat: float = 5.0
    connect_concurrency: int = 64
    settle: float = 2.0
    pid: int | None = None
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint each user's token")
    parser.add_argument("--count", type=int, default=1000, help="connections (N)")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds to hold them")
    parser.add_argument(
        "--heartbeat", type=float, default=5.0, help="seconds between the client's pings"
    )
    parser.add_argument("--connect-concurrency", type=int, default=64, help="opened at a time")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds after closing before the last RSS"
    )
    parser.add_argument(
        "--pid", type=int, default=None, help="notifyd's pid (default: found by --url's port)"
    )


def options_from(args: argparse.Namespace) -> ConnectionsOptions:
    return options_of(ConnectionsOptions, args)


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on `port` (IPv4 and IPv6), from /proc/net/tcp*."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != LISTEN:
                continue
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def pid_listening_on(port: int) -> int | None:
    """The process holding a socket that listens on `port`, or None."""
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    if not wanted:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in wanted:
                        return int(proc.name)
        except OSError:  # gone, or not ours to read
            continue
    return None


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError as exc:
        raise BenchError(f"cannot read the memory of pid {pid}: {exc}") from None
    raise BenchError(f"/proc/{pid}/status has no VmRSS")


def nofile_limit(pid: int) -> int | None:
    """The soft open-files limit of `pid` (None when unlimited or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return int(soft) if soft.isdigit() else None
    except OSError:
        return None
    return None


def local_port_range() -> tuple[int, int] | None:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return None
    return int(low), int(high)


async def _server_gauge(session: aiohttp.ClientSession, base: str) -> int | None:
    try:
        async with session.get(base + "/metrics") as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    found = _GAUGE.search(text)
    return int(float(found.group(1))) if found else None


async def main(options: ConnectionsOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.count < 1 or o.hold < 0 or o.heartbeat <= 0 or o.connect_concurrency < 1:
        raise BenchError("--count, --heartbeat and --connect-concurrency must be positive")
    require_loopback_url(o.url, "--url")
    base = o.url.rstrip("/")
    port = urlsplit(base).port or 80
    pid = o.pid if o.pid is not None else pid_listening_on(port)
    if pid is None:
        raise BenchError(f"no process found listening on port {port}; give --pid")
    ports = local_port_range()
    if ports is not None and o.count > ports[1] - ports[0] + 1:
        raise BenchError(f"{o.count} connections need more local ports than {ports} offers")
    nofile = raise_nofile_limit(o.count + 256)
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    minter = TokenMinter(o.jwt_secret)
    ttl = int(o.hold) + 3600
    users = [f"bench-{run_id}-c{i}" for i in range(o.count)]
    say = (lambda _m: None) if o.quiet else log
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    readers: list[asyncio.Task[None]] = []
    closed_early = 0
    holding = True

    async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
        """Read (and so answer pings) until the socket closes."""
        nonlocal closed_early
        async for _ in ws:
            pass
        if holding:
            closed_early += 1

    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector)
    gate = asyncio.Semaphore(o.connect_concurrency)

    async def connect(user: str) -> None:
        token = minter.mint(tenant_id=tenant, user_id=user, role="user", ttl=ttl)
        async with gate:
            try:
                ws = await session.ws_connect(
                    f"{base}/ws/notifications/{tenant}/{user}/",
                    headers={"Authorization": f"Bearer {token}"},
                    heartbeat=o.heartbeat,
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise BenchError(f"connecting failed: {exc or type(exc).__name__}") from None
            sockets.append(ws)
            try:
                first = await ws.receive(timeout=CONNECT_TIMEOUT_S)
            except TimeoutError:
                raise BenchError(f"no first frame within {CONNECT_TIMEOUT_S:.0f} s") from None
            if first.type != aiohttp.WSMsgType.TEXT:
                raise BenchError(f"the daemon closed a socket at once (code {ws.close_code})")
            readers.append(asyncio.create_task(drain(ws), name="connections-reader"))

    try:
        rss_before = rss_kib(pid)
        began = time.monotonic()
        await all_or_none(connect(user) for user in users)
        setup_s = max(1e-6, time.monotonic() - began)
        say(f"{len(sockets)} connections held after {setup_s:.1f} s; holding {o.hold:.0f} s")
        await asyncio.sleep(o.hold)
        held = len(sockets) - closed_early
        gauge = await _server_gauge(session, base)
        rss_after = rss_kib(pid)
        holding = False
    finally:
        holding = False
        await _close(sockets, readers)
        await session.close()
    await asyncio.sleep(o.settle)
    rss_closed = rss_kib(pid)
    return {
        "workload": "connections",
        "count": o.count,
        "held": held,
        "closed_early": closed_early,
        "server_connections": gauge,
        "hold_s": o.hold,
        "heartbeat_s": o.heartbeat,
        "setup_per_s": round(len(sockets) / setup_s, 1),
        "pid": pid,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_kib_per_conn": round((rss_after - rss_before) / held, 2) if held else None,
        "rss_after_close_kib": rss_closed,
        "daemon_nofile": nofile_limit(pid),
        "harness_nofile": nofile,
        "local_port_range": list(ports) if ports else None,
        "run": {"tenant": tenant, "url": o.url},
        "machine": machine(),
    }


async def _close(
    sockets: list[aiohttp.ClientWebSocketResponse], readers: list[asyncio.Task[None]]
) -> None:
    gate = asyncio.Semaphore(256)

    async def close(ws: aiohttp.ClientWebSocketResponse) -> None:
        async with gate:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), CLOSE_BOUND_S)

    await asyncio.gather(*(close(ws) for ws in sockets))
    for reader in readers:
        reader.cancel()
    for reader in readers:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


__all__ = ["ConnectionsOptions", "add_arguments", "main", "options_from"]
