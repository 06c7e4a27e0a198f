"""What every workload shares: loopback checks, tokens, percentiles, the machine, the output.

The harness starts nothing by hand and talks only to loopback: every URL it is given is
checked before the first byte is sent.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import math
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import asyncpg
import jwt
import orjson

from notifyd.auth.tokens import mint_token
from notifyd.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
Options = TypeVar("Options", bound="DataclassInstance")

DEFAULT_URL = "http://127.0.0.1:8000"  # notifyd as `notifyd serve` listens by default


def add_url_argument(parser: argparse.ArgumentParser) -> None:
    """`--url`, notifyd's HTTP address (checked to be loopback before any request)."""
    parser.add_argument("--url", default=DEFAULT_URL, help="notifyd (loopback)")


def add_env_argument(
    parser: argparse.ArgumentParser, flag: str, help: str, default: str | None = ""
) -> None:
    """`flag` (`--database-url`) defaulting to the daemon's own variable of the same name
    (`$DATABASE_URL`): the shell that runs notifyd runs its benchmarks as it is."""
    env = flag.removeprefix("--").replace("-", "_").upper()
    parser.add_argument(
        flag, default=os.environ.get(env, default), help=f"{help} (default: ${env})"
    )


def options_of(cls: type[Options], args: argparse.Namespace, **given: Any) -> Options:
    """A workload's options (`cls`, a dataclass) from its parsed command line: each field
    from the argument of the same name, else `given`, else the field's default."""
    named = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**(named | given))


class BenchError(Exception):
    """A run cannot start or cannot be trusted; the message says why."""


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def require_loopback_url(url: str, what: str) -> None:
    """Refuse any URL whose host is not this machine's loopback (or a Unix socket path)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "unix" and parts.path:
        return  # redis-py's unix:///path/to/redis.sock: a socket file on this machine
    if not host:
        # postgresql:///db?host=/run/postgresql: a Unix socket is as local as it gets
        if parts.scheme.startswith("postgres") and ("host=/" in parts.query or not parts.query):
            return
        raise BenchError(f"{what}: no host in {url!r}")
    if host.startswith("/"):
        return
    if not _is_loopback_host(host):
        raise BenchError(f"{what}: {host!r} is not loopback; the harness only uses loopback")


class TokenMinter:
    """Signs tokens in the claim names notifyd is configured with (JWT_* in the environment),
    with the daemon's `secret`; plain HS256 with the default names when the environment does
    not make valid settings. Settings are read once: workloads mint thousands of tokens."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 16:
            raise BenchError("--jwt-secret (or JWT_SECRET) must be the daemon's secret")
        self._secret = secret
        try:
            self._settings: Settings | None = load_settings(
                {**os.environ, "JWT_SECRET": secret}, dotenv_file=None
            )
        except SettingsError:
            self._settings = None

    @property
    def user_claim(self) -> str:
        """The claim that names the user (bare servers of `limits` read it unverified)."""
        return self._settings.jwt_user_claim if self._settings else "user_id"

    def mint(self, *, tenant_id: str, user_id: str, role: str, ttl: int) -> str:
        if self._settings is not None:
            return mint_token(
                self._settings, tenant_id=tenant_id, user_id=user_id, role=role, ttl=ttl
            )
        now = int(time.time())
        claims = {
            "tenant_id": tenant_id,
            "user_id": user_id,
            "role": role,
            "iat": now,
            "exp": now + ttl,
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")


def service_token(secret: str, *, tenant_id: str, user_id: str, ttl: int) -> str:
    """A `service` token for `tenant_id`, signed with the daemon's `secret`."""
    return TokenMinter(secret).mint(tenant_id=tenant_id, user_id=user_id, role="service", ttl=ttl)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[rank - 1])


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 and max (nearest rank), rounded to 0.1; None when there is nothing."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 0.50), 1),
        "p99": round(percentile(ordered, 0.99), 1),
        "max": round(float(ordered[-1]), 1),
    }


def _cpu_model() -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or None
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _mem_total_kib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def machine() -> dict[str, Any]:
    """The machine the figures belong to (the harness shares it with everything else)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": _cpu_model(),
        "mem_total_kib": _mem_total_kib(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


async def postgres_version(conn: asyncpg.Connection) -> str:
    return str(await conn.fetchval("SHOW server_version"))


async def redis_version(url: str | None) -> str | None:
    """The Redis server's version, when a (loopback) REDIS_URL is known; None otherwise."""
    if not url:
        return None
    require_loopback_url(url, "REDIS_URL")
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    client = Redis.from_url(url, socket_timeout=5)
    try:
        info: Mapping[str, Any] = await client.info("server")
        return str(info.get("redis_version"))
    except (RedisError, OSError):
        return None
    finally:
        await client.aclose()


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's open-file limit to the hard limit when `wanted` needs it (one
    descriptor per socket); returns the soft limit now in force (-1: unlimited)."""
    infinite = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != infinite and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != infinite and soft < wanted:
        raise BenchError(f"{wanted} open files needed, the hard limit is {hard} (ulimit -Hn)")
    return int(soft)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def all_or_none(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as grouped:
        first = grouped.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    return [t.result() for t in tasks]


def ratio(value: float | None, ceiling: float | None) -> float | None:
    """value ÷ ceiling to 3 places; None when either is missing or the ceiling is 0."""
    if value is None or not ceiling:
        return None
    return round(value / ceiling, 3)


def emit(result: Mapping[str, Any]) -> None:
    """One JSON line per run on stdout."""
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    """Progress for the operator, on stderr so stdout stays one JSON line."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
