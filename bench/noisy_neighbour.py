"""`noisy_neighbour`: does one tenant's dead relay delay another tenant's email?

Tenant A (`bench-<run>-a`) is given its own SMTP relay, a `bench.relay.SwitchRelay` on
127.0.0.1 that accepts TCP connections and never answers; tenant B (`bench-<run>-b`) sends
through the platform relay, the harness's SMTP sink (aiosmtpd, a process of its own) on
`--smtp-port`, where the daemon must send its mail (`EMAIL_HOST=127.0.0.1
EMAIL_PORT=<port>`, as for `email_e2e`). The daemon must let tenants use a relay on
loopback (the egress policy: allow 127.0.0.1), and must have a `JWT_SECRET` the harness
knows (an admin token sets A's relay through `PUT /tenants/current/settings/`). The run:

1. Probe: one email of B must reach the sink within `--probe-timeout`.
2. B alone: B posts `--b-count` emails at `--b-rate` per second; each one's end-to-end
   latency is from sending its POST to the sink's receipt of its DATA (CLOCK_MONOTONIC).
3. B beside A: A posts `--a-count` emails as fast as the daemon takes them (they queue ahead
   of B's on the delivery stream, and A's relay hangs), then B posts the same paced series
   again, measured the same way.
4. A's relay keeps hanging until `--hang` seconds after A's first post (so its circuit
   opens), then recovers (forwards to the sink from then on); the run waits until every one of
   A's emails arrived, bounded by `--margin`, then `--settle` seconds for duplicates.

Figures: `b_alone` and `b_beside` (p50/p99/max ms, missing), `p99_ratio` = beside ÷ alone
(the target is at most `target_ratio`, 2.0), A's `arrived`, `missing` and `duplicates` and
how long after the recovery its last email arrived, and the daemon's own parked counters
from /metrics. The machine's ceiling here is B alone on the same daemon in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.common import (
    BenchError,
    TokenMinter,
    log,
    machine,
    options_of,
    require_loopback_url,
    summary,
)
from bench.email_e2e import add_sink_argument
from bench.relay import SwitchRelay
from bench.spawn import BareServer, MailLog

TARGET_RATIO = 2.0
REQUEST_TIMEOUT_S = 30.0
POST_CONCURRENCY = 16
SLOWEST = 5  # the slowest of each series named in the result, with their place in it


@dataclass(slots=True)
class NoisyOptions:
    url: str = "http://127.0.0.1:8000"
    jwt_secret: str = ""
    smtp_port: int = 2525
    a_count: int = 600
    b_count: int = 500
    b_rate: float = 50.0
    margin: float = 180.0
    hang: float = 15.0
    settle: float = 1.0
    probe_timeout: float = 60.0
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="notifyd (loopback)")
    parser.add_argument(
        "--jwt-secret",
        default=os.environ.get("JWT_SECRET", ""),
        help="the daemon's JWT_SECRET (default: $JWT_SECRET)",
    )
    add_sink_argument(parser)
    parser.add_argument("--a-count", type=int, default=600, help="emails of the noisy tenant")
    parser.add_argument(
        "--b-count",
        type=int,
        default=500,
        help="emails of the other tenant in each series (the p99 of 100 would be the second "
        "slowest: one email's noise)",
    )
    parser.add_argument("--b-rate", type=float, default=50.0, help="B's posts per second")
    parser.add_argument(
        "--margin",
        type=float,
        default=180.0,
        help="seconds to wait for A's mail after its relay recovers (the breaker's cool-down, "
        "NOTIFYD_BREAKER_COOLDOWN, comes first)",
    )
    parser.add_argument(
        "--hang",
        type=float,
        default=15.0,
        help="A's relay hangs at least this long after A's first post (long enough for its "
        "circuit to open: NOTIFYD_BREAKER_FAILURES failures of NOTIFYD_SMTP_CONNECT_TIMEOUT)",
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to watch for repeats")
    parser.add_argument("--probe-timeout", type=float, default=60.0, help="seconds for the probe")


def options_from(args: argparse.Namespace) -> NoisyOptions:
    return options_of(NoisyOptions, args)


class _Client:
    def __init__(self, session: aiohttp.ClientSession, url: str, minter: TokenMinter) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._minter = minter
        self._headers: dict[tuple[str, str], dict[str, str]] = {}

    def _auth(self, tenant: str, role: str) -> dict[str, str]:
        key = (tenant, role)
        if key not in self._headers:
            token = self._minter.mint(tenant_id=tenant, user_id="bench", role=role, ttl=7200)
            self._headers[key] = {"Authorization": f"Bearer {token}"}
        return self._headers[key]

    async def send(self, tenant: str, token: str) -> str | None:
        """None on 202, else what went wrong."""
        body = orjson.dumps(
            {
                "notification_type": "email",
                "recipient": "bench@example.test",
                "subject": f"[bench:{token}] noisy neighbour",
                "message": "Benchmark email.",
            }
        )
        headers = {**self._auth(tenant, "service"), "Content-Type": "application/json"}
        try:
            async with self._session.post(
                self._url + "/notifications/send/", data=body, headers=headers
            ) as response:
                payload = await response.read()
                if response.status == 202:
                    return None
                return f"http {response.status}: {payload[:200].decode(errors='replace')}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__

    async def use_relay(self, tenant: str, port: int) -> None:
        smtp = {"host": "127.0.0.1", "port": port, "from_email": "noisy@bench.example"}
        async with self._session.put(
            self._url + "/tenants/current/settings/",
            json={"smtp": smtp},
            headers=self._auth(tenant, "admin"),
        ) as response:
            if response.status != 200:
                text = (await response.read())[:300].decode(errors="replace")
                raise BenchError(
                    f"setting tenant A's relay failed ({response.status}): {text}; the daemon "
                    "must allow tenant relays on 127.0.0.1 (egress policy)"
                )

    async def parked(self) -> dict[str, float]:
        """notifyd_deliveries_parked_total by reason, from /metrics."""
        async with self._session.get(self._url + "/metrics") as response:
            text = (await response.read()).decode()
        parked: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("notifyd_deliveries_parked_total{") and 'channel="email"' in line:
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                parked[reason] += float(line.rsplit(" ", 1)[1])
        return dict(parked)


async def _paced(
    client: _Client, tenant: str, tokens: list[str], rate: float, posted: dict[str, int]
) -> Counter[str]:
    """Post `tokens` at `rate` per second (each at its own time, not waiting for the last)."""
    errors: Counter[str] = Counter()
    start = time.monotonic()

    async def one(i: int, token: str) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        posted[token] = time.monotonic_ns()
        problem = await client.send(tenant, token)
        if problem is not None:
            errors[problem[:80]] += 1
            del posted[token]

    await asyncio.gather(*(one(i, t) for i, t in enumerate(tokens)))
    return errors


async def _burst(client: _Client, tenant: str, tokens: list[str]) -> tuple[set[str], Counter[str]]:
    accepted: set[str] = set()
    errors: Counter[str] = Counter()
    queue = list(reversed(tokens))

    async def worker() -> None:
        while queue:
            token = queue.pop()
            problem = await client.send(tenant, token)
            if problem is None:
                accepted.add(token)
            else:
                errors[problem[:80]] += 1

    await asyncio.gather(*(worker() for _ in range(min(POST_CONCURRENCY, len(tokens)))))
    return accepted, errors


def _latencies(mail: MailLog, posted: dict[str, int]) -> dict[str, Any]:
    arrived = {t: mail.first(t) for t in posted}
    values = [(first - posted[t]) / 1e6 for t, first in arrived.items() if first is not None]
    got = summary(values)
    # which of the series were slowest (0 = the first posted): B's first emails queued behind
    # A's backlog, or slow ones spread over the run (the machine, not the daemon's order)
    order = {t: i for i, t in enumerate(sorted(posted, key=posted.__getitem__))}
    slowest = sorted(
        (
            (order[t], round((first - posted[t]) / 1e6, 1))
            for t, first in arrived.items()
            if first is not None
        ),
        key=lambda pair: -pair[1],
    )[:SLOWEST]
    return {
        "accepted": len(posted),
        "arrived": len(values),
        "missing": len(posted) - len(values),
        "p50_ms": got["p50"],
        "p99_ms": got["p99"],
        "max_ms": got["max"],
        "slowest": [{"index": i, "ms": ms} for i, ms in slowest],
    }


async def main(options: NoisyOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.a_count < 1 or o.b_count < 1 or o.b_rate <= 0 or min(o.margin, o.hang, o.settle) < 0:
        raise BenchError("--a-count, --b-count and --b-rate must be positive")
    require_loopback_url(o.url, "--url")
    minter = TokenMinter(o.jwt_secret)
    run_id = secrets.token_hex(4)
    tenant_a, tenant_b = f"bench-{run_id}-a", f"bench-{run_id}-b"
    say = (lambda _m: None) if o.quiet else log
    mail = MailLog()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    relay: SwitchRelay | None = None
    async with (
        BareServer("smtp", "--port", str(o.smtp_port), on_line=mail.on_line) as sink,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=POST_CONCURRENCY * 4), timeout=timeout
        ) as session,
    ):
        client = _Client(session, o.url, minter)
        try:
            relay = SwitchRelay(sink.port)
            await relay.start()
            probe = f"probe.{run_id}"
            mail.expect({probe})
            error = await client.send(tenant_b, probe)
            if error is not None:
                raise BenchError(f"POST /notifications/send/ failed: {error}")
            if not await mail.wait(time.monotonic() + o.probe_timeout):
                raise BenchError(
                    f"the probe email did not reach the sink on 127.0.0.1:{sink.port} in "
                    f"{o.probe_timeout:.0f} s: start notifyd with EMAIL_HOST=127.0.0.1 "
                    f"EMAIL_PORT={sink.port}"
                )
            b_wait = o.b_count / o.b_rate + 60.0

            say(f"B alone: {o.b_count} emails at {o.b_rate:g}/s")
            alone_tokens = [f"{run_id}-b0-{i}" for i in range(o.b_count)]
            alone_posted: dict[str, int] = {}
            alone_errors = await _paced(client, tenant_b, alone_tokens, o.b_rate, alone_posted)
            mail.expect(set(alone_posted))
            await mail.wait(time.monotonic() + b_wait)

            await client.use_relay(tenant_a, relay.port)
            say(f"A: {o.a_count} emails to a relay that never answers")
            a_tokens = [f"{run_id}-a-{i}" for i in range(o.a_count)]
            hung_since = time.monotonic()
            a_accepted, a_errors = await _burst(client, tenant_a, a_tokens)
            say(f"B beside A: {o.b_count} emails at {o.b_rate:g}/s")
            beside_tokens = [f"{run_id}-b1-{i}" for i in range(o.b_count)]
            beside_posted: dict[str, int] = {}
            beside_errors = await _paced(client, tenant_b, beside_tokens, o.b_rate, beside_posted)
            mail.expect(set(beside_posted))
            await mail.wait(time.monotonic() + b_wait)
            await asyncio.sleep(max(0.0, hung_since + o.hang - time.monotonic()))
            a_before = sum(1 for t in a_accepted if mail.first(t) is not None)
            parked = await client.parked()

            say("A's relay recovers; waiting for A's mail")
            relay.recover()
            recovered_ns = time.monotonic_ns()
            mail.expect(a_accepted)
            if not await mail.wait(time.monotonic() + o.margin):
                say("the wait ended at its bound with A's mail outstanding")
            await asyncio.sleep(o.settle)
            parked_after = await client.parked()
        finally:
            if relay is not None:
                await relay.close()

    alone = _latencies(mail, alone_posted)
    beside = _latencies(mail, beside_posted)
    a_firsts = [f for t in a_accepted if (f := mail.first(t)) is not None]
    ratio = (
        round(beside["p99_ms"] / alone["p99_ms"], 2)
        if alone["p99_ms"] and beside["p99_ms"] is not None
        else None
    )
    return {
        "workload": "noisy_neighbour",
        "a_count": o.a_count,
        "b_count": o.b_count,
        "b_rate": o.b_rate,
        "b_alone": alone,
        "b_beside": beside,
        "p99_ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "within_target": ratio is not None and ratio <= TARGET_RATIO,
        "a": {
            "accepted": len(a_accepted),
            "arrived_while_hung": a_before,
            "arrived": len(a_firsts),
            "missing": len(a_accepted) - len(a_firsts),
            "duplicates": mail.duplicates(f"{run_id}-a-"),
            "last_arrival_after_recovery_s": (
                round(max(0, max(a_firsts) - recovered_ns) / 1e9, 2) if a_firsts else None
            ),
        },
        "b_duplicates": mail.duplicates(f"{run_id}-b"),
        "post_errors": dict(alone_errors + a_errors + beside_errors),
        "parked_while_hung": parked,
        "parked_total": parked_after,
        "run": {"tenants": [tenant_a, tenant_b], "url": o.url, "smtp_port": o.smtp_port},
        "machine": machine(),
    }


__all__ = ["NoisyOptions", "add_arguments", "main", "options_from"]
