"""`tenant_config`: what reading tenants' templates from their auth service costs a send.

The harness runs the auth service's stand-in (aiohttp, on 127.0.0.1:`--source-port`): it
serves, per tenant, `{"default_locale": "en", "templates": [<an in-app template>]}` with an
ETag, answers 304 to `If-None-Match`, 404 for tenants it has nothing for, and counts every
request. Start notifyd with
`NOTIFYD_TENANT_CONFIG_URL=http://127.0.0.1:<port>/tenants/{tenant_id}/notification-config`,
`NOTIFYD_TENANT_CONFIG_TOKEN=<--source-token>` and a short `NOTIFYD_TENANT_CONFIG_TTL`
(`--ttl`, e.g. 5). The run, with `--tenants` tenants of each kind (all of this run only):

1. `sourced` tenants have their template at the source; `stored` tenants get a 404 there and
   the same template through `PUT /templates/…` (notifyd's own copy). Each tenant's first
   send is timed alone: `cold_*` (the sourced tenant's includes the fetch).
2. `--duration` seconds of in-app sends with that template (`--connections` at once, round
   robin over the tenants), alternating sourced, stored, stored, sourced: `sourced` and
   `stored` give per_s, p50/p99 for each; `source_requests_per_tenant_per_ttl` how often
   the source was asked meanwhile (about 1 or less: not once per send).
3. The source turns slow (`--slow-delay` seconds per answer, past the 1 s a read of an
   expired copy may wait): after the copies expire, `--duration` seconds of sourced sends
   give `slow` (per_s, p99, max); the last good copy serves them, so they should match
   `sourced`.

Figures are relative within the run: `sourced_over_stored` is the rate of sends rendered from
the source's template over the rate of those rendered from the stored one, on one daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

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
    require_loopback_url,
    summary,
)

TEMPLATE_KEY = "benchGreeting"
TEXT = "Hello {{ name }}, your interview for {{ position }} is confirmed."
REQUEST_TIMEOUT_S = 30.0


@dataclass(slots=True)
class TenantConfigOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    source_port: int = 8099
    source_token: str = "bench-source-token"
    ttl: float = 5.0
    tenants: int = 20
    connections: int = 16
    duration: float = 8.0
    slow_delay: float = 3.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint tokens")
    parser.add_argument("--source-port", type=int, default=8099, help="the stand-in's port")
    parser.add_argument(
        "--source-token",
        default="bench-source-token",
        help="the bearer the stand-in accepts (the daemon's NOTIFYD_TENANT_CONFIG_TOKEN)",
    )
    parser.add_argument(
        "--ttl", type=float, default=5.0, help="the daemon's NOTIFYD_TENANT_CONFIG_TTL"
    )
    parser.add_argument("--tenants", type=int, default=20, help="tenants of each kind")
    parser.add_argument("--connections", type=int, default=16, help="HTTP connections")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per phase")
    parser.add_argument(
        "--slow-delay", type=float, default=3.0, help="seconds the slow source takes to answer"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def options_from(args: argparse.Namespace) -> TenantConfigOptions:
    return options_of(TenantConfigOptions, args)


@dataclass
class StandIn:
    """The auth service: a document per sourced tenant, 404 for the others."""

    token: str
    documents: dict[str, bytes] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    delay: float = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        self.requests[tenant] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return web.Response(status=401)
        raw = self.documents.get(tenant)
        if raw is None:
            return web.Response(status=404)
        etag = '"' + hashlib.sha256(raw).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=raw, content_type="application/json", headers={"ETag": etag})


def _document() -> bytes:
    return orjson.dumps(
        {
            "default_locale": "en",
            "templates": [{"template_key": TEMPLATE_KEY, "channel": "in_app", "text_body": TEXT}],
        }
    )


@dataclass
class Client:
    session: aiohttp.ClientSession
    base: str
    minter: TokenMinter
    tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def headers(self, tenant: str, role: str) -> dict[str, str]:
        token = self.tokens.get((tenant, role))
        if token is None:
            token = self.tokens[(tenant, role)] = self.minter.mint(
                tenant_id=tenant, user_id=f"bench-{role}", role=role, ttl=7200
            )
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def send(self, tenant: str, i: int) -> tuple[float, str | None]:
        """(milliseconds, None) on 202, else (milliseconds, what went wrong)."""
        body = orjson.dumps(
            {
                "notification_type": "in_app",
                "recipient": f"bench-user-{i % 500}",
                "template_key": TEMPLATE_KEY,
                "context": {"name": "Ann", "position": "Engineer"},
            }
        )
        started = time.perf_counter()
        try:
            async with self.session.post(
                self.base + "/notifications/send/",
                data=body,
                headers=self.headers(tenant, "service"),
            ) as response:
                payload = await response.read()
                problem = (
                    None
                    if response.status == 202
                    else f"http {response.status}: {payload[:160].decode(errors='replace')}"
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = type(exc).__name__
        return (time.perf_counter() - started) * 1000, problem

    async def store_template(self, tenant: str) -> None:
        async with self.session.put(
            f"{self.base}/templates/{TEMPLATE_KEY}/in_app/",
            data=orjson.dumps({"text_body": TEXT}),
            headers=self.headers(tenant, "admin"),
        ) as response:
            if response.status != 200:
                raise BenchError(f"PUT /templates/ answered {response.status}")
            await response.read()


async def _load(
    client: Client, tenants: list[str], connections: int, duration: float
) -> dict[str, Any]:
    """`duration` seconds of sends over `tenants`, round robin: rate and latency."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counter = itertools.count()
    deadline = time.monotonic() + duration

    async def worker() -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            ms, problem = await client.send(tenants[i % len(tenants)], i)
            if problem is None:
                latencies.append(ms)
            else:
                errors[problem[:80]] += 1

    started = time.monotonic()
    await all_or_none(worker() for _ in range(connections))
    elapsed = time.monotonic() - started
    got = summary(latencies)
    return {
        "sent": len(latencies),
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": got["p50"],
        "p99_ms": got["p99"],
        "max_ms": got["max"],
        "errors": dict(errors),
    }


def _merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Two phases of one kind: summed counts, mean rate, the worse latencies."""
    return {
        "sent": sum(r["sent"] for r in runs),
        "per_s": round(sum(r["per_s"] for r in runs) / len(runs), 1),
        "p50_ms": max(r["p50_ms"] or 0 for r in runs),
        "p99_ms": max(r["p99_ms"] or 0 for r in runs),
        "max_ms": max(r["max_ms"] or 0 for r in runs),
        "errors": sum(sum(r["errors"].values()) for r in runs),
    }


async def main(options: TenantConfigOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.tenants < 1 or o.connections < 1 or o.duration <= 0 or o.ttl <= 0:
        raise BenchError("--tenants, --connections, --duration and --ttl must be positive")
    require_loopback_url(o.url, "--url")
    say = (lambda _m: None) if o.quiet else log
    run_id = secrets.token_hex(4)
    sourced = [f"bench-{run_id}-s{i}" for i in range(o.tenants)]
    stored = [f"bench-{run_id}-t{i}" for i in range(o.tenants)]
    source = StandIn(o.source_token, {tenant: _document() for tenant in sourced})
    app = web.Application()
    app.router.add_get("/tenants/{tenant}/notification-config", source.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", o.source_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise BenchError(f"the stand-in cannot listen on {o.source_port}: {exc}") from None
    connector = aiohttp.TCPConnector(limit=o.connections + 1)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            client = Client(session, o.url.rstrip("/"), TokenMinter(o.jwt_secret))
            ms, problem = await client.send(sourced[0], 0)
            if problem is not None or not source.requests:
                raise BenchError(
                    f"the probe send: {problem or 'the source was never asked'}; start notifyd "
                    f"with NOTIFYD_TENANT_CONFIG_URL=http://127.0.0.1:{o.source_port}/tenants/"
                    "{tenant_id}/notification-config and NOTIFYD_TENANT_CONFIG_TOKEN="
                    f"{o.source_token}"
                )
            cold_sourced = [ms]
            for tenant in sourced[1:]:
                ms, problem = await client.send(tenant, 0)
                if problem is not None:
                    raise BenchError(f"a sourced tenant's first send: {problem}")
                cold_sourced.append(ms)
            cold_stored = []
            for tenant in stored:
                await client.store_template(tenant)  # the first request also fetches (404)
                ms, problem = await client.send(tenant, 0)
                if problem is not None:
                    raise BenchError(f"a stored tenant's first send: {problem}")
                cold_stored.append(ms)
            say(f"cold sends done; {o.duration:.0f} s per phase, sourced/stored alternating")

            phases: dict[str, list[dict[str, Any]]] = {"sourced": [], "stored": []}
            before = sum(source.requests[t] for t in sourced)
            started = time.monotonic()
            for kind in ("sourced", "stored", "stored", "sourced"):
                tenants = sourced if kind == "sourced" else stored
                phases[kind].append(await _load(client, tenants, o.connections, o.duration))
            span = time.monotonic() - started
            asked = sum(source.requests[t] for t in sourced) - before

            say(f"the source turns slow ({o.slow_delay:.1f} s); waiting for the copies to expire")
            source.delay = o.slow_delay
            await asyncio.sleep(o.ttl + 0.5)
            slow = await _load(client, sourced, o.connections, o.duration)
            source.delay = 0.0
    finally:
        await runner.cleanup()

    sourced_run, stored_run = _merge(phases["sourced"]), _merge(phases["stored"])
    cold_s, cold_t = summary(cold_sourced), summary(cold_stored)
    return {
        "workload": "tenant_config",
        "tenants": o.tenants,
        "connections": o.connections,
        "duration": o.duration,
        "ttl": o.ttl,
        "cold_sourced_p50_ms": cold_s["p50"],
        "cold_sourced_p99_ms": cold_s["p99"],
        "cold_stored_p50_ms": cold_t["p50"],
        "cold_stored_p99_ms": cold_t["p99"],
        "sourced": sourced_run,
        "stored": stored_run,
        "sourced_over_stored": round(sourced_run["per_s"] / stored_run["per_s"], 3)
        if stored_run["per_s"]
        else None,
        # the sourced tenants' copies were used for half the span; each may be asked once per
        # TTL at most, from every instance that serves it (one here)
        "source_requests_per_tenant_per_ttl": round(asked / o.tenants / (span / o.ttl), 2),
        "slow": {**slow, "source_delay_s": o.slow_delay},
        "unauthorized": source.unauthorized,
        "run": {"tenants": f"bench-{run_id}-*", "url": o.url},
        "machine": machine(),
    }


__all__ = ["TenantConfigOptions", "add_arguments", "main", "options_from"]
