"""`rest_ingest`: C connections POST in-app notifications for D seconds; how many does
notifyd accept per second, how fast does it answer?

Every request is `POST /notifications/send/` `{"notification_type": "in_app", "recipient":
"bench-<run>-u<n mod --recipients>", "message": …}` with a service token of a tenant of
this run only (`bench-<run>`). One probe request goes first (a refused token or a wrong URL
stops the run there); then the load generator of `bench.loadgen` runs: wrk with
`bench/wrk/post.lua` when installed, else a Python client (`"generator"` says which).

Figures: `req_per_s` (2xx answers per second), `p50_ms`, `p99_ms`, `max_ms`, `errors`
(non-2xx answers plus socket errors; `last_non2xx` shows one status).

Accepting is half the work: every accepted notification is then delivered in-app. The run
follows the daemon's `notifyd_deliveries_total{channel="in_app",outcome="sent"}` until it
has grown by every request accepted (or `--drain-bound` seconds pass) and reports
`delivered` (that growth), `drain_s` (how long delivery ran on after the load stopped) and
`delivered_per_s` (accepted notifications delivered per second from the load's start to the
last delivery). A rate the daemon accepts but cannot deliver shows as a long `drain_s`.
Other in-app traffic on the daemon during the run counts too: measure on a quiet daemon.

With `--pid` (notifyd's), the CPU time spent per answered request is reported for the
daemon (`daemon_cpu_us_per_req`) and for all local PostgreSQL and Redis processes
(`postgres_cpu_us_per_req`, `redis_cpu_us_per_req`): on a shared machine these move by a
few per cent between identical runs where the rate moves by 10-15 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import loadgen
from bench.common import BenchError, log, machine, require_loopback_url, service_token

SERVICE_USER = "bench-service"


@dataclass(slots=True)
class IngestOptions:
    url: str = "http://127.0.0.1:8000"
    jwt_secret: str = ""
    connections: int = 32
    duration: float = 10.0
    threads: int = 1
    generator: str = "auto"
    recipients: int = 1000
    quiet: bool = False
    pid: int | None = None  # notifyd's: its CPU time per request is reported
    cpu_settle: float = 2.0
    drain_bound: float = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="notifyd (loopback)")
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("JWT_SECRET", ""),
        help="the daemon's JWT_SECRET, to mint a service token (default: $JWT_SECRET)",
    )
    parser.add_argument(
        "--pid",
        type=int,
        default=None,
        help="notifyd's pid: report the CPU time it spent per request (daemon_cpu_us_per_req)",
    )
    parser.add_argument(
        "--cpu-settle",
        type=float,
        default=2.0,
        help="with --pid: seconds after the load during which the daemon's CPU still counts "
        "(the in-app deliveries of the last requests)",
    )
    parser.add_argument(
        "--drain-bound",
        type=float,
        default=60.0,
        help="seconds to follow the in-app deliveries after the load, at most",
    )
    add_load_arguments(parser)


def add_load_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The load's shape: shared with `limits`, which loads its bare server alike."""
    parser.add_argument(f"--{prefix}connections", type=int, default=32, help="connections (C)")
    parser.add_argument(f"--{prefix}duration", type=float, default=10.0, help="seconds (D)")
    parser.add_argument(
        f"--{prefix}threads", type=int, default=1, help="wrk threads (default 1: one core)"
    )
    parser.add_argument(
        f"--{prefix}generator",
        choices=loadgen.GENERATORS,
        default="auto",
        help="auto: wrk when installed, else the Python client",
    )
    parser.add_argument(
        f"--{prefix}recipients", type=int, default=1000, help="distinct in-app recipients"
    )


def options_from(args: argparse.Namespace) -> IngestOptions:
    return IngestOptions(
        url=args.url,
        jwt_secret=args.jwt_secret,
        connections=args.connections,
        duration=args.duration,
        threads=args.threads,
        generator=args.generator,
        recipients=args.recipients,
        pid=args.pid,
        cpu_settle=args.cpu_settle,
        drain_bound=args.drain_bound,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (`/proc/<pid>/stat`, fields 14 and 15).

    The steadier yardstick on a shared machine: between identical runs the rate moves by
    10-15 %, the daemon's CPU per request by a few per cent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise BenchError(f"--pid {pid}: cannot read /proc/{pid}/stat: {exc}") from None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the line
    return ticks / os.sysconf("SC_CLK_TCK")


SERVERS = {"postgres": "postgres", "redis": "redis-server"}  # figure name → process name


def servers_cpu_seconds() -> dict[str, float]:
    """CPU time so far of every PostgreSQL and Redis process on this machine, by server.

    Read around the run, the difference is what the servers spent on it (the run uses only
    loopback, so they are local). A process that starts during the run counts from its
    start; one that ends during it (a short autovacuum worker) is missed, so the figure is a
    floor. Other databases' work on the same servers counts too: measure on a quiet stack."""
    spent = dict.fromkeys(SERVERS, 0.0)
    names = {process: figure for figure, process in SERVERS.items()}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        command = text[text.find("(") + 1 : text.rfind(")")]
        figure = names.get(command)
        if figure is not None:
            fields = text.rsplit(")", 1)[1].split()
            spent[figure] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return spent


async def _probe(load: loadgen.Load) -> None:
    url = load.url.rstrip("/") + loadgen.PATH
    headers = {"Authorization": f"Bearer {load.token}", "Content-Type": "application/json"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.post(
                url, data=loadgen.body(load.recipient_prefix, 1, 0), headers=headers
            ) as response,
        ):
            text = await response.text()
            if response.status != 202:
                raise BenchError(f"POST {loadgen.PATH} answered {response.status}: {text[:300]}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"POST {loadgen.PATH} failed: {exc or type(exc).__name__}") from None


SENT_IN_APP = 'notifyd_deliveries_total{channel="in_app",outcome="sent"}'


def in_app_sent(metrics_text: str) -> float:
    """The daemon's count of in-app deliveries from its /metrics page (0 before the first)."""
    for line in metrics_text.splitlines():
        if line.startswith(SENT_IN_APP):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _sent_so_far(session: aiohttp.ClientSession, url: str) -> float:
    try:
        async with session.get(url.rstrip("/") + "/metrics") as response:
            if response.status != 200:
                raise BenchError(f"GET /metrics answered {response.status}")
            return in_app_sent(await response.text())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BenchError(f"GET /metrics failed: {exc or type(exc).__name__}") from None


async def _follow_delivery(
    session: aiohttp.ClientSession, url: str, baseline: float, expected: int, bound: float
) -> tuple[int, float]:
    """Until the daemon has delivered `expected` more in-app notifications than `baseline`
    or `bound` seconds passed; returns (delivered, seconds waited)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        delivered = int(await _sent_so_far(session, url) - baseline)
        waited = loop.time() - started
        if delivered >= expected or waited >= bound:
            return delivered, waited
        await asyncio.sleep(0.05)


async def main(options: IngestOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.recipients < 1:
        raise BenchError("--recipients must be positive")
    require_loopback_url(o.url, "--url")
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    token = service_token(
        o.jwt_secret, tenant_id=tenant, user_id=SERVICE_USER, ttl=int(o.duration) + 3600
    )
    load = loadgen.Load(
        url=o.url,
        token=token,
        recipient_prefix=f"bench-{run_id}-u",
        recipients=o.recipients,
        connections=o.connections,
        duration=o.duration,
        threads=o.threads,
        generator=o.generator,
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        before_probe = await _sent_so_far(session, o.url)
        await _probe(load)
        if not o.quiet:
            log(f"probe accepted; {o.connections} connections for {o.duration:.0f} s")
        # the probe's own delivery must not count: wait for it, then take the baseline
        await _follow_delivery(session, o.url, before_probe, 1, 5.0)
        baseline = await _sent_so_far(session, o.url)
        cpu_before = cpu_seconds(o.pid) if o.pid is not None else None
        servers_before = servers_cpu_seconds() if o.pid is not None else {}
        started = time.perf_counter()
        figures = await loadgen.run(load)
        load_s = time.perf_counter() - started
        accepted = int(figures.get("requests") or 0) - int(figures.get("non2xx") or 0)
        delivered, drain_s = await _follow_delivery(
            session, o.url, baseline, accepted, o.drain_bound
        )
    extra: dict[str, Any] = {
        "delivered": delivered,
        "drain_s": round(drain_s, 2),
        "delivered_per_s": round(min(delivered, accepted) / (load_s + drain_s), 1),
    }
    if o.pid is not None and cpu_before is not None:
        await asyncio.sleep(max(0.0, o.cpu_settle - drain_s))
        spent = cpu_seconds(o.pid) - cpu_before
        answered = int(figures.get("requests") or 0)
        extra["daemon_cpu_us_per_req"] = round(spent / answered * 1e6, 1) if answered else None
        servers_after = servers_cpu_seconds()
        for figure, before in servers_before.items():
            used = servers_after[figure] - before
            extra[f"{figure}_cpu_us_per_req"] = (
                round(used / answered * 1e6, 1) if answered else None
            )
    return {
        "workload": "rest_ingest",
        **figures,
        **extra,
        "recipients": o.recipients,
        "run": {"tenant": tenant, "url": o.url},
        "machine": machine(),
    }


__all__ = ["IngestOptions", "add_arguments", "add_load_arguments", "main", "options_from"]
