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
Where /metrics cannot be read (e.g. not served on the address given), the three are null
and the rest of the run stands.

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
from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    log,
    machine,
    options_of,
    require_loopback_url,
    service_token,
)

SERVICE_USER = "bench-service"


@dataclass(slots=True)
class IngestOptions:
    url: str = DEFAULT_URL
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
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint a service token")
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
    return options_of(IngestOptions, args)


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


Process = tuple[int, int]  # (pid, start time in clock ticks): a pid reused is another process


def server_processes() -> dict[Process, tuple[str, float]]:
    """Every local PostgreSQL and Redis process: its server (figure name) and CPU so far."""
    found: dict[Process, tuple[str, float]] = {}
    names = {process: figure for figure, process in SERVERS.items()}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        figure = names.get(text[text.find("(") + 1 : text.rfind(")")])
        if figure is None:
            continue
        fields = text.rsplit(")", 1)[1].split()  # fields[0] is field 3 of the line
        started = int(fields[19])  # field 22: start time
        found[(int(entry.name), started)] = (figure, (int(fields[11]) + int(fields[12])) / tick)
    return found


def servers_cpu_seconds(
    before: dict[Process, tuple[str, float]], after: dict[Process, tuple[str, float]]
) -> dict[str, float]:
    """CPU the servers spent between two readings of `server_processes`, by server.

    Per process: one started in between counts from its start, one that ended in between (a
    short autovacuum worker) is missed, so the figure is a floor. The run uses only loopback,
    so its servers are local; another cluster busy on the same machine counts too, so
    measure on a quiet one."""
    spent = dict.fromkeys(SERVERS, 0.0)
    for process, (figure, cpu) in after.items():
        spent[figure] += cpu - before.get(process, (figure, 0.0))[1]
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


METRICS_TIMEOUT = aiohttp.ClientTimeout(total=2)


async def _sent_so_far(session: aiohttp.ClientSession, url: str) -> float | None:
    """The daemon's in-app delivery count, or None when /metrics cannot be read right now
    (not served on this address, or a slow answer): the run's other figures stand."""
    try:
        async with session.get(url.rstrip("/") + "/metrics", timeout=METRICS_TIMEOUT) as response:
            if response.status != 200:
                return None
            return in_app_sent(await response.text())
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _follow_delivery(
    session: aiohttp.ClientSession, url: str, baseline: float | None, expected: int, bound: float
) -> tuple[int | None, float]:
    """Until the daemon has delivered `expected` more in-app notifications than `baseline`
    or `bound` seconds passed; returns (delivered, seconds waited). Delivered is None when
    the count was never readable; a count below the baseline (the daemon restarted) is 0."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    delivered: int | None = None
    while baseline is not None:
        now = await _sent_so_far(session, url)
        if now is not None:
            delivered = max(0, int(now - baseline))
        waited = loop.time() - started
        if (delivered is not None and delivered >= expected) or waited >= bound:
            return delivered, waited
        await asyncio.sleep(0.1)
    return None, 0.0


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
        probe_delivered, _ = await _follow_delivery(session, o.url, before_probe, 1, 5.0)
        if before_probe is None:
            log("GET /metrics unreadable: delivered, drain_s and delivered_per_s are left out")
        elif not probe_delivered:
            log("the probe was not delivered within 5 s: a late delivery would count as the load's")
        baseline = await _sent_so_far(session, o.url) if before_probe is not None else None
        cpu_before = cpu_seconds(o.pid) if o.pid is not None else None
        servers_before = server_processes() if o.pid is not None else {}
        started = time.perf_counter()
        figures = await loadgen.run(load)
        load_s = time.perf_counter() - started
        accepted = int(figures.get("requests") or 0) - int(figures.get("non2xx") or 0)
        delivered, drain_s = await _follow_delivery(
            session, o.url, baseline, accepted, o.drain_bound
        )
    extra: dict[str, Any] = {
        "delivered": delivered,
        "drain_s": round(drain_s, 2) if delivered is not None else None,
        "delivered_per_s": (
            round(min(delivered, accepted) / (load_s + drain_s), 1)
            if delivered is not None
            else None
        ),
    }
    if o.pid is not None and cpu_before is not None:
        await asyncio.sleep(max(0.0, o.cpu_settle - drain_s))
        spent = cpu_seconds(o.pid) - cpu_before
        answered = int(figures.get("requests") or 0)
        extra["daemon_cpu_us_per_req"] = round(spent / answered * 1e6, 1) if answered else None
        spent_by = servers_cpu_seconds(servers_before, server_processes())
        for figure, used in spent_by.items():
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
