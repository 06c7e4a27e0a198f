"""The HTTP load generator of `rest_ingest` and of `limits`: the same POSTs against both.

`wrk` with `bench/wrk/post.lua` when it is installed (Debian package `wrk`): C connections
for D seconds, latency percentiles and non-2xx counts from the script's done() hook. Where
wrk is missing, C aiohttp workers in this process do the same, slower (the harness's own
loop then limits the rate long before a fast server does); the result says which one ran.

`req_per_s` counts 2xx answers only; `errors` is every other answer plus socket errors
(connect, read, write, timeout). wrk measures latency from its send to the answer, on open
connections (closed loop: a slow answer delays the next request, so queueing delay inside a
slow server partly hides in a lower rate rather than in p99).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import BenchError, percentile

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "post.lua"
WRK_TIMEOUT_S = 10
REQUEST_TIMEOUT_S = 10.0
PATH = "/notifications/send/"
GENERATORS = ("auto", "wrk", "python")


@dataclass(slots=True)
class Load:
    url: str  # base URL of the server
    token: str
    recipient_prefix: str
    recipients: int = 1000
    connections: int = 32
    duration: float = 10.0
    threads: int = 1
    generator: str = "auto"


def body(prefix: str, recipients: int, n: int) -> bytes:
    """The same body wrk's script builds: an in-app notification to one of `recipients`."""
    return (
        f'{{"notification_type":"in_app","recipient":"{prefix}{n % recipients}",'
        f'"message":"bench 0-{n}"}}'
    ).encode()


def which_generator(requested: str) -> str:
    if requested not in GENERATORS:
        raise BenchError(f"--generator must be one of {', '.join(GENERATORS)}")
    if requested == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if requested == "wrk":
        raise BenchError("wrk is not installed (Debian: apt-get install -y wrk)")
    return "python"


async def run(load: Load) -> dict[str, Any]:
    """Load the server; returns the figures (req_per_s, p50_ms, p99_ms, errors, ...)."""
    if load.connections < 1 or load.duration <= 0 or load.threads < 1:
        raise BenchError("--connections, --duration and --threads must be positive")
    generator = which_generator(load.generator)
    if generator == "wrk":
        return await _wrk(load)
    return await _python(load)


async def _wrk(load: Load) -> dict[str, Any]:
    threads = min(load.threads, load.connections)
    env = {
        **os.environ,
        "BENCH_TOKEN": load.token,
        "BENCH_PATH": PATH,
        "BENCH_PREFIX": load.recipient_prefix,
        "BENCH_RECIPIENTS": str(load.recipients),
    }
    process = await asyncio.create_subprocess_exec(
        "wrk",
        f"-t{threads}",
        f"-c{load.connections}",
        f"-d{max(1, round(load.duration))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "-s",
        str(WRK_SCRIPT),
        load.url.rstrip("/") + PATH,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), load.duration + WRK_TIMEOUT_S + 30)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise BenchError("wrk did not finish in time") from None
    line = next((x for x in out.decode().splitlines() if x.startswith("BENCH_JSON ")), None)
    if process.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({process.returncode}): {err.decode()[-400:]}")
    w = orjson.loads(line.removeprefix("BENCH_JSON "))
    seconds = w["duration_us"] / 1e6
    socket_errors = {k: w[k] for k in ("connect", "read", "write", "timeout") if w[k]}
    ok = w["requests"] - w["non2xx"]
    return {
        "generator": "wrk",
        "connections": load.connections,
        "threads": threads,
        "duration_s": round(seconds, 2),
        "requests": w["requests"],
        "req_per_s": round(ok / seconds, 1),
        "p50_ms": round(w["p50_us"] / 1000, 2),
        "p99_ms": round(w["p99_us"] / 1000, 2),
        "max_ms": round(w["max_us"] / 1000, 2),
        "errors": w["non2xx"] + sum(socket_errors.values()),
        "non2xx": w["non2xx"],
        "last_non2xx": w["last_non2xx"] or None,
        "socket_errors": socket_errors,
    }


async def _python(load: Load) -> dict[str, Any]:
    url = load.url.rstrip("/") + PATH
    headers = {"Authorization": f"Bearer {load.token}", "Content-Type": "application/json"}
    latencies: list[float] = []
    counter = itertools.count()
    non2xx = 0
    last_non2xx: int | None = None
    socket_errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=load.connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.monotonic()
        deadline = began + load.duration

        async def worker() -> None:
            nonlocal non2xx, last_non2xx
            while time.monotonic() < deadline:
                data = body(load.recipient_prefix, load.recipients, next(counter))
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=data, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    name = type(exc).__name__
                    socket_errors[name] = socket_errors.get(name, 0) + 1
                    continue
                latencies.append((time.perf_counter() - sent) * 1000)
                if not 200 <= status <= 299:
                    non2xx += 1
                    last_non2xx = status

        await asyncio.gather(*(worker() for _ in range(load.connections)))
        seconds = time.monotonic() - began
    ordered = sorted(latencies)
    ok = len(latencies) - non2xx
    return {
        "generator": "python",
        "connections": load.connections,
        "threads": 1,
        "duration_s": round(seconds, 2),
        "requests": len(latencies),
        "req_per_s": round(ok / seconds, 1),
        "p50_ms": round(percentile(ordered, 0.50), 2) if ordered else None,
        "p99_ms": round(percentile(ordered, 0.99), 2) if ordered else None,
        "max_ms": round(ordered[-1], 2) if ordered else None,
        "errors": non2xx + sum(socket_errors.values()),
        "non2xx": non2xx,
        "last_non2xx": last_non2xx,
        "socket_errors": socket_errors,
    }
