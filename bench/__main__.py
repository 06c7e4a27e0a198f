"""`python -m bench <workload> [options]`: one JSON line per run on stdout."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from bench import (
    connections,
    email_e2e,
    ingest,
    limits,
    noisy_neighbour,
    redis_footprint,
    reminders,
    rest_ingest,
    retention,
    suite,
    tenant_config,
    ui,
    webhooks,
    workflows,
    ws_fanout,
)
from bench.common import BenchError, emit

T = TypeVar("T")

# name → (module, one line of help); each module has add_arguments, options_from and main
WORKLOADS: dict[str, tuple[Any, str]] = {
    "reminders": (
        reminders,
        "Q reminders spread over T seconds: lateness p50/p99/max, missing, duplicates",
    ),
    "workflows": (
        workflows,
        "N triggers of a three-step workflow, some read meanwhile: step lateness, once each",
    ),
    "limits": (limits, "the ceilings, with no notifyd code in the path (needs PG and Redis)"),
    "rest_ingest": (rest_ingest, "C connections POST in-app notifications for D seconds"),
    "email_e2e": (email_e2e, "K emails posted, until all reach the harness's SMTP sink"),
    "ws_fanout": (ws_fanout, "R rooms x M members, S messages per sender (burst or --rate)"),
    "noisy_neighbour": (
        noisy_neighbour,
        "a tenant's relay hangs under its backlog: another tenant's email latency beside it",
    ),
    "connections": (connections, "N idle WebSockets: notifyd's RSS per connection"),
    "redis_footprint": (
        redis_footprint,
        "in-app notifications to N made-up ids: Redis memory and keys, before and after expiry",
    ),
    "ingest": (
        ingest,
        "N events waiting in Kafka (and the Redis stream, RabbitMQ): stored notifications/s",
    ),
    "retention": (retention, "rest_ingest's p99 while 1,000,000 expired rows are purged"),
    "webhooks": (
        webhooks,
        "K in-app notifications: their webhooks' rate and latency at a verifying receiver",
    ),
    "tenant_config": (
        tenant_config,
        "sends rendered from templates the tenants' auth service serves, beside stored ones",
    ),
    "ui": (ui, "the web components: bytes, gzip, first render, a 1,000-item inbox's scroll"),
    "all": (suite, "limits, then every workload, then each figure beside its ceiling"),
}


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # the daemon's loop when it is there, asyncio's otherwise
        return asyncio.run(coro)
    return uvloop.run(coro)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Load a running notifyd over loopback and print one JSON line of figures.",
    )
    workloads = parser.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name, (module, summary) in WORKLOADS.items():
        module.add_arguments(
            workloads.add_parser(
                name,
                help=summary,
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workload == "all":
            lines = _run(suite.main(suite.options_from(args), emit))
            return 1 if any("error" in line for line in lines) else 0
        if args.workload not in WORKLOADS:  # pragma: no cover - argparse refuses them
            raise BenchError(f"unknown workload {args.workload!r}")
        module = WORKLOADS[args.workload][0]
        result = _run(module.main(module.options_from(args)))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
