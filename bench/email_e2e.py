"""`email_e2e`: K email notifications posted as fast as the daemon takes them; how fast do
they reach an SMTP server, how late, are any missing or sent twice?

The harness runs its own SMTP sink (aiosmtpd, in a process of its own) on 127.0.0.1:
`--smtp-port` (default 2525). The daemon under test must send its mail there: start notifyd
with `EMAIL_HOST=127.0.0.1 EMAIL_PORT=<that port>` (and no TLS, no login). The run:

1. Probe: one email, which must reach the sink within `--probe-timeout` seconds (default
   60); otherwise the daemon is not pointed at the sink and the run stops with that message.
   The probe also opens the daemon's SMTP connections, so the run does not measure their
   set-up. (A daemon that kept pooled connections to the sink of an earlier run finds them
   closed: its first attempts fail and are retried with backoff, which can take tens of
   seconds; hence the long default.)
2. Post K `POST /notifications/send/` (email, `--concurrency` connections) with a service
   token of a tenant of this run only (`bench-<run>`), each with the subject
   `[bench:<run>-<i>] …`: the token the sink reads back.
3. Wait until every accepted (202) email arrived, bounded by `--margin` seconds after the
   last post, then `--settle` seconds more, the window in which a second sending would show.

Figures: `per_s` = accepted emails that arrived ÷ (last first-arrival - first post);
`missing` = accepted but never arrived; `duplicates` = arrivals beyond the first per email;
`p50_ms`/`p99_ms`/`max_ms` from sending the POST to the sink's receipt of the DATA (both on
CLOCK_MONOTONIC, one machine); `posted_per_s` = 202s per second while posting.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.common import (
    DEFAULT_URL,
    BenchError,
    add_env_argument,
    add_url_argument,
    all_or_none,
    log,
    machine,
    options_of,
    require_loopback_url,
    service_token,
    summary,
)
from bench.spawn import BareServer, MailLog

SERVICE_USER = "bench-service"
REQUEST_TIMEOUT_S = 30.0
DEFAULT_SMTP_PORT = 2525


@dataclass(slots=True)
class EmailOptions:
    url: str = DEFAULT_URL
    jwt_secret: str = ""
    smtp_port: int = DEFAULT_SMTP_PORT
    count: int = 1000
    concurrency: int = 16
    margin: float = 60.0
    settle: float = 1.0
    probe_timeout: float = 60.0
    sink_refuses_every: int = 0  # the harness's own tests: the sink answers 550 to every Nth
    quiet: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_url_argument(parser)
    add_env_argument(parser, "--jwt-secret", "the daemon's JWT_SECRET, to mint a service token")
    add_sink_argument(parser)
    parser.add_argument("--count", type=int, default=1000, help="emails (K)")
    parser.add_argument("--concurrency", type=int, default=16, help="HTTP connections")
    parser.add_argument(
        "--margin", type=float, default=60.0, help="seconds to wait after the last post"
    )
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds to watch for duplicates at the end"
    )
    parser.add_argument(
        "--probe-timeout", type=float, default=60.0, help="seconds the probe email may take"
    )


def add_sink_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smtp-port",
        type=int,
        default=int(os.environ.get("BENCH_SMTP_PORT", DEFAULT_SMTP_PORT)),
        help="port of the harness's SMTP sink on 127.0.0.1; start notifyd with "
        "EMAIL_HOST=127.0.0.1 EMAIL_PORT=<this> (default: $BENCH_SMTP_PORT or 2525)",
    )


def options_from(args: argparse.Namespace) -> EmailOptions:
    return options_of(EmailOptions, args)


def _body(token: str, i: int) -> bytes:
    return orjson.dumps(
        {
            "notification_type": "email",
            "recipient": f"bench-{i % 1000}@example.test",
            "subject": f"[bench:{token}] benchmark",
            "message": f"Benchmark email {token}.",
        }
    )


async def _post(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: bytes
) -> str | None:
    """None on 202, else what went wrong."""
    try:
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status == 202:
                return None
            return f"http {response.status}: {payload[:200].decode(errors='replace')}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def main(options: EmailOptions) -> dict[str, Any]:
    """Run the workload; returns the result (the CLI prints it as one JSON line)."""
    o = options
    if o.count < 1 or o.concurrency < 1 or o.margin < 0 or o.settle < 0:
        raise BenchError("--count and --concurrency must be positive")
    if not 0 < o.smtp_port < 65536:
        raise BenchError("--smtp-port must be a TCP port the daemon sends its mail to")
    require_loopback_url(o.url, "--url")
    run_id = secrets.token_hex(4)
    tenant = f"bench-{run_id}"
    token = service_token(o.jwt_secret, tenant_id=tenant, user_id=SERVICE_USER, ttl=7200)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = o.url.rstrip("/") + "/notifications/send/"
    say = (lambda _m: None) if o.quiet else log
    mail = MailLog()
    connector = aiohttp.TCPConnector(limit=o.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with (
        BareServer(
            "smtp",
            "--port",
            str(o.smtp_port),
            "--refuse-every",
            str(o.sink_refuses_every),
            on_line=mail.on_line,
        ) as sink,
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
    ):
        probe = f"probe.{run_id}"  # outside the run's prefix: never in the figures
        mail.expect({probe})
        error = await _post(session, url, headers, _body(probe, 0))
        if error is not None:
            raise BenchError(f"POST /notifications/send/ failed: {error}")
        if not await mail.wait(time.monotonic() + o.probe_timeout):
            raise BenchError(
                f"the probe email did not reach the sink on 127.0.0.1:{sink.port} in "
                f"{o.probe_timeout:.0f} s: start notifyd with EMAIL_HOST=127.0.0.1 "
                f"EMAIL_PORT={sink.port} (and no EMAIL_USE_TLS/SSL, no login)"
            )
        say(f"probe arrived; posting {o.count} emails")
        tokens = [f"{run_id}-{i}" for i in range(o.count)]
        posted_ns = [0] * o.count
        accepted: set[str] = set()
        errors: Counter[str] = Counter()
        counter = itertools.count()

        async def worker() -> None:
            while (i := next(counter)) < o.count:
                posted_ns[i] = time.monotonic_ns()
                problem = await _post(session, url, headers, _body(tokens[i], i))
                if problem is None:
                    accepted.add(tokens[i])
                else:
                    errors[problem[:80]] += 1

        first_post_ns = time.monotonic_ns()
        await all_or_none(worker() for _ in range(min(o.concurrency, o.count)))
        post_s = max(1e-9, (time.monotonic_ns() - first_post_ns) / 1e9)
        say(f"{len(accepted)} accepted in {post_s:.1f} s; waiting for the sink")
        mail.expect(accepted)
        complete = await mail.wait(time.monotonic() + o.margin)
        if not complete:
            say("the wait ended at its bound with mail outstanding")
        await asyncio.sleep(o.settle)  # the window in which a second sending would show

    arrived = [mail.first(t) for t in tokens]
    latencies = [
        (first - posted_ns[i]) / 1e6
        for i, first in enumerate(arrived)
        if first is not None and tokens[i] in accepted
    ]
    firsts = [f for i, f in enumerate(arrived) if f is not None and tokens[i] in accepted]
    span_s = max(1e-9, (max(firsts) - first_post_ns) / 1e9) if firsts else None
    prefix = f"{run_id}-"
    got = summary(latencies)
    return {
        "workload": "email_e2e",
        "count": o.count,
        "concurrency": o.concurrency,
        "accepted": len(accepted),
        "post_errors": dict(errors),
        "posted_per_s": round(len(accepted) / post_s, 1),
        "arrived": len(firsts),
        "per_s": round(len(firsts) / span_s, 1) if span_s else 0.0,
        "missing": len(accepted) - len(firsts),
        "duplicates": mail.duplicates(prefix),
        "unaccepted_arrived": sum(
            1 for i, t in enumerate(tokens) if t not in accepted and arrived[i] is not None
        ),
        "sink_received": mail.count(prefix),
        "p50_ms": got["p50"],
        "p99_ms": got["p99"],
        "max_ms": got["max"],
        "smtp_port": o.smtp_port,
        "run": {"tenant": tenant, "url": o.url},
        "machine": machine(),
    }


__all__ = ["EmailOptions", "add_arguments", "add_sink_argument", "main", "options_from"]
