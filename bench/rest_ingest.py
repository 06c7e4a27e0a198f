"""`rest_ingest`: C connections POST in-app notifications for D seconds; how many does
notifyd accept per second, how fast does it answer?

Every request is `POST /notifications/send/` `{"notification_type": "in_app", "recipient":
"bench-<run>-u<n mod --recipients>", "message": …}` with a service token of a tenant of
this run only (`bench-<run>`). One probe request goes first (a refused token or a wrong URL
stops the run there); then the load generator of `bench.loadgen` runs: wrk with
`bench/wrk/post.lua` when installed, else a Python client (`"generator"` says which).

Figures: `req_per_s` (2xx answers per second), `p50_ms`, `p99_ms`, `max_ms`, `errors`
(non-2xx answers plus socket errors; `last_non2xx` shows one status). Every accepted
notification is then delivered in-app by the daemon: a run leaves it that backlog, which
the next run would measure too (`python -m bench all` waits for it to drain).
"""

from __future__ import annotations

import argparse
import os
import secrets
from dataclasses import dataclass
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="notifyd (loopback)")
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("JWT_SECRET", ""),
        help="the daemon's JWT_SECRET, to mint a service token (default: $JWT_SECRET)",
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
    )


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
    await _probe(load)
    if not o.quiet:
        log(f"probe accepted; {o.connections} connections for {o.duration:.0f} s")
    figures = await loadgen.run(load)
    return {
        "workload": "rest_ingest",
        **figures,
        "recipients": o.recipients,
        "run": {"tenant": tenant, "url": o.url},
        "machine": machine(),
    }


__all__ = ["IngestOptions", "add_arguments", "add_load_arguments", "main", "options_from"]
