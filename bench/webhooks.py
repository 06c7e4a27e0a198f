"""`webhooks`: K in-app notifications posted; how fast do their `notification.queued` webhooks
reach a receiver, how late after the POST, are any missing or sent twice?

The harness runs the receiver (aiohttp, on 127.0.0.1:`--receiver-port`, 0: any free port),
which verifies every request with the `standardwebhooks` package as a tenant's would. The
daemon under test must be allowed to call it and to store a secret: start notifyd with
`NOTIFYD_TENANT_SECRET_KEY=<any>`, `NOTIFYD_WEBHOOK_ALLOW_HTTP=true` and
`NOTIFYD_EGRESS_ALLOWED_NETWORKS=127.0.0.1/32`. The run:

1. An admin token of a tenant of this run only (`bench-<run>`) creates an endpoint for
   `notification.queued` pointing at the receiver; a probe notification's webhook must
   arrive within `--probe-timeout` seconds, else the run stops saying what to set.
2. K `POST /notifications/send/` (in-app, `--concurrency` connections; at `--rate` posts a
   second if given, else as fast as they are accepted), each answer's id noted with the
   time its POST was sent.
3. Wait until every accepted notification's webhook arrived, bounded by `--margin` seconds
   after the last post, then `--settle` seconds more (a second sending would show there);
   the endpoint is deleted.

Figures: `per_s` = webhooks arrived ÷ (last first-arrival - first post); `missing`;
`duplicates` (arrivals of a `webhook-id` beyond the first); `p50_ms`/`p99_ms`/`max_ms` from
sending the POST to the receiver's verified arrival (one clock); `posted_per_s`;
`unverified` (requests no secret verified: must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

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

REQUEST_TIMEOUT_S = 30.0
ENDPOINTS = "/webhooks/endpoints/"


@dataclass(slots=True)
class WebhookOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    receiver_port: int = 0
    count: int = 1000
    concurrency: int = 16
    rate: float = 0.0  # posts per second in all; 0: as fast as the daemon takes them
    margin: float = 60.0
    settle: float = 1.0
    probe_timeout: float = 30.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint tokens")
    parser.add_argument(
        "--receiver-port", type=int, default=0, help="the receiver's port (0: any free one)"
    )
    parser.add_argument("--count", type=int, default=1000, help="notifications (K)")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP connections")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="posts per second (paced: latency without a backlog); 0: as fast as accepted",
    )
    parser.add_argument(
        "--margin", type=float, default=60.0, help="seconds to wait after the last post"
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds to watch for duplicates at the end"
    )
    parser.add_argument(
        "--probe-timeout", type=float, default=30.0, help="seconds the probe's webhook may take"
    )


def options_from(args: argparse.Namespace) -> WebhookOptions:
    return options_of(WebhookOptions, args)


@dataclass
class Receiver:
    """Verifies each request; notes the first arrival per notification id."""

    webhook: Webhook | None = None
    first: dict[str, int] = field(default_factory=dict)  # notification id → monotonic ns
    ids: Counter[str] = field(default_factory=Counter)  # webhook-id → arrivals
    unverified: int = 0
    expected: set[str] = field(default_factory=set)
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        now = time.monotonic_ns()
        try:
            assert self.webhook is not None
            event = self.webhook.verify(raw, dict(request.headers))
        except (AssertionError, WebhookVerificationError):
            self.unverified += 1
            return web.Response(status=401)
        self.ids[request.headers["webhook-id"]] += 1
        notification_id = event["data"]["notification_id"]
        self.first.setdefault(notification_id, now)
        if self.expected and self.expected <= self.first.keys():
            self.complete.set()
        return web.Response(status=204)

    def expect(self, ids: set[str]) -> None:
        self.expected = set(ids)
        self.complete.clear()
        if self.expected <= self.first.keys():
            self.complete.set()


async def _send(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], i: int
) -> tuple[str | None, str | None]:
    """(notification id, None) on 202, else (None, what went wrong)."""
    body = orjson.dumps(
        {"notification_type": "in_app", "recipient": f"bench-user-{i % 1000}", "message": "hi"}
    )
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status == 202:
                return str(orjson.loads(payload)["notification_id"]), None
            return None, f"http {response.status}: {payload[:200].decode(errors='replace')}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, type(exc).__name__


async def main(options: WebhookOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.count < 1 or o.concurrency < 1 or o.margin < 0 or o.settle < 0 or o.rate < 0:
        raise BenchError("--count and --concurrency must be positive")
    require_loopback_url(o.url, "--url")
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    minter = TokenMinter(o.jwt_secret)
    service = minter.mint(tenant_id=tenant, user_id="bench-service", role="service", ttl=7200)
    admin = minter.mint(tenant_id=tenant, user_id="bench-admin", role="admin", ttl=7200)
    base = o.url.rstrip("/")
    send_url = base + "/notifications/send/"
    send_headers = {"Authorization": f"Bearer {service}", "Content-Type": "application/json"}
    admin_headers = {"Authorization": f"Bearer {admin}"}
    say = (lambda _m: None) if o.quiet else log

    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", o.receiver_port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    connector = aiohttp.TCPConnector(limit=o.concurrency + 1)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    endpoint_id = None
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.post(
                base + ENDPOINTS,
                json={"url": f"http://127.0.0.1:{port}/hook", "events": ["notification.queued"]},
                headers=admin_headers,
            ) as response:
                created = await response.json(content_type=None)
                if response.status != 201:
                    raise BenchError(
                        f"creating the endpoint answered {response.status}: {created}; start "
                        "notifyd with NOTIFYD_TENANT_SECRET_KEY=<any>, "
                        "NOTIFYD_WEBHOOK_ALLOW_HTTP=true and "
                        "NOTIFYD_EGRESS_ALLOWED_NETWORKS=127.0.0.1/32"
                    )
            endpoint_id = created["id"]
            receiver.webhook = Webhook(created["secret"])
            probe, error = await _send(session, send_url, send_headers, 0)
            if probe is None:
                raise BenchError(f"POST /notifications/send/ failed: {error}")
            receiver.expect({probe})
            try:
                await asyncio.wait_for(receiver.complete.wait(), o.probe_timeout)
            except TimeoutError:
                raise BenchError(
                    f"the probe's webhook did not arrive in {o.probe_timeout:.0f} s"
                ) from None
            say(f"probe arrived; posting {o.count} notifications")

            posted_ns: dict[str, int] = {}
            errors: Counter[str] = Counter()
            counter = itertools.count(1)

            async def worker() -> None:
                while (i := next(counter)) <= o.count:
                    if o.rate > 0:  # the i-th post's time on the schedule
                        due = first_post_ns + int((i - 1) * 1e9 / o.rate)
                        await asyncio.sleep(max(0.0, (due - time.monotonic_ns()) / 1e9))
                    sent_ns = time.monotonic_ns()
                    notification_id, problem = await _send(session, send_url, send_headers, i)
                    if notification_id is not None:
                        posted_ns[notification_id] = sent_ns
                    else:
                        errors[(problem or "")[:80]] += 1

            first_post_ns = time.monotonic_ns()
            await all_or_none(worker() for _ in range(min(o.concurrency, o.count)))
            post_s = max(1e-9, (time.monotonic_ns() - first_post_ns) / 1e9)
            say(f"{len(posted_ns)} accepted in {post_s:.1f} s; waiting for the webhooks")
            receiver.expect(set(posted_ns))
            try:
                await asyncio.wait_for(receiver.complete.wait(), o.margin)
            except TimeoutError:
                say("the wait ended at its bound with webhooks outstanding")
            await asyncio.sleep(o.settle)
            async with session.delete(
                f"{base}{ENDPOINTS}{endpoint_id}/", headers=admin_headers
            ) as response:
                await response.read()
    finally:
        await runner.cleanup()

    arrivals = {n: receiver.first[n] for n in posted_ns if n in receiver.first}
    latencies = [(arrivals[n] - posted_ns[n]) / 1e6 for n in arrivals]
    span_s = max(1e-9, (max(arrivals.values()) - first_post_ns) / 1e9) if arrivals else None
    got = summary(latencies)
    return {
        "workload": "webhooks",
        "count": o.count,
        "concurrency": o.concurrency,
        "rate": o.rate,
        "accepted": len(posted_ns),
        "post_errors": dict(errors),
        "posted_per_s": round(len(posted_ns) / post_s, 1),
        "arrived": len(arrivals),
        "per_s": round(len(arrivals) / span_s, 1) if span_s else 0.0,
        "missing": len(posted_ns) - len(arrivals),
        "duplicates": sum(n - 1 for n in receiver.ids.values() if n > 1),
        "unverified": receiver.unverified,
        "p50_ms": got["p50"],
        "p99_ms": got["p99"],
        "max_ms": got["max"],
        "run": {"tenant": tenant, "url": o.url, "endpoint": endpoint_id},
        "machine": machine(),
    }


__all__ = ["WebhookOptions", "add_arguments", "main", "options_from"]
