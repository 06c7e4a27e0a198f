"""`python -m bench <workload> [options]`: one JSON line per run on stdout."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from bench import reminders
from bench.common import BenchError, emit


def _run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
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
    reminders.add_arguments(
        workloads.add_parser(
            "reminders",
            help="Q reminders spread over T seconds: lateness p50/p99/max, missing, duplicates",
            description=reminders.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workload == "reminders":
            result = _run(reminders.main(reminders.options_from(args)))
        else:  # pragma: no cover - argparse refuses unknown workloads
            raise BenchError(f"unknown workload {args.workload!r}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
