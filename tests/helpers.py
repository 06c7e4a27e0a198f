"""Helpers shared by the tests: settings, tokens, an HTTP client bound to one daemon."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import asyncpg
import jwt
import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from notifyd.app import Daemon
from notifyd.auth.tokens import mint_token
from notifyd.keys import Keys
from notifyd.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
TEST_JWT_SECRET = "test-secret-that-is-long-enough-0123456789"


def base_env(database_url: str, redis_url: str, **env: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "JWT_SECRET": TEST_JWT_SECRET,
        "NOTIFYD_HOST": "127.0.0.1",
        "NOTIFYD_PORT": "0",
        "NOTIFYD_SHUTDOWN_TIMEOUT": "5",
        "NOTIFYD_SEND_TIMEOUT": "3",
        "NOTIFYD_DB_POOL_MIN": "1",
        "NOTIFYD_DB_POOL_MAX": "5",
        "NOTIFYD_STREAM_BLOCK": "0.1",
        **env,
    }


def make_settings(database_url: str, redis_url: str, **env: str) -> Settings:
    return load_settings(base_env(database_url, redis_url, **env), dotenv_file=None)


def token(
    settings: Settings,
    tenant: str = "TEN-0001",
    user: str = "user-1",
    role: str = "user",
    ttl: int = 600,
) -> str:
    return mint_token(settings, tenant_id=tenant, user_id=user, role=role, ttl=ttl)


def raw_token(
    claims: Mapping[str, Any],
    key: Any = TEST_JWT_SECRET,
    algorithm: str = "HS256",
    headers: dict[str, Any] | None = None,
) -> str:
    """A token with exactly these claims, for forgery tests."""
    payload = dict(claims)
    payload.setdefault("exp", int(time.time()) + 600)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


async def next_json(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> Any:
    """The socket's next message, which must be a JSON text frame (else the test fails
    naming what came instead, and the close code if the socket was closed)."""
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, (message, ws.close_code)
    return orjson.loads(message.data)


class Api:
    """An aiohttp client for one daemon, minting tokens for any tenant, user and role."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.base = f"http://127.0.0.1:{daemon.port}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Api:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._session is not None
        await self._session.close()

    def token(self, tenant: str = "TEN-0001", user: str = "user-1", role: str = "user") -> str:
        return token(self.daemon.settings, tenant, user, role)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        tenant: str = "TEN-0001",
        user: str = "user-1",
        role: str = "user",
        bearer: str | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, Mapping[str, str]]:
        """(status, decoded body or None, headers)."""
        assert self._session is not None
        all_headers = dict(headers or {})
        if auth:
            all_headers.setdefault(
                "Authorization", f"Bearer {bearer or self.token(tenant, user, role)}"
            )
        async with self._session.request(
            method, self.base + path, json=json, data=data, headers=all_headers
        ) as response:
            raw = await response.read()
            body: Any = None
            if raw and "json" in response.headers.get("Content-Type", ""):
                body = await response.json(content_type=None)
            elif raw:
                body = raw.decode()
            return response.status, body, response.headers

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, Mapping[str, str]]:
        return await self.request("GET", path, **kw)

    async def post(
        self, path: str, json: Any = None, **kw: Any
    ) -> tuple[int, Any, Mapping[str, str]]:
        return await self.request("POST", path, json=json, **kw)


async def wait_for(
    condition: Callable[[], Awaitable[object] | object],
    timeout: float = 10.0,
    interval: float = 0.02,
) -> None:
    """Poll `condition` (a plain or an async callable) until its result is truthy; fail with
    a clear message after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await _result(condition):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def _result(condition: Callable[[], Awaitable[object] | object]) -> object:
    result = condition()
    return await result if inspect.isawaitable(result) else result


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m notifyd ARGS` in a subprocess with exactly `env` (plus PATH)."""
    full_env = {"PATH": os.environ.get("PATH", ""), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "notifyd", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
    )


IN_FLIGHT = """
SELECT count(*) FROM notifications WHERE status IN ('queued', 'dispatched', 'sending', 'retrying')
"""


async def pipeline_idle(redis: Redis, db: asyncpg.Connection, keys: Keys) -> bool:
    """Nothing left to do, now: every consumer group has read and acknowledged every entry of
    its stream, no wheel entry is due, no notification is on its way. Counting "exactly once"
    is only meaningful then: a duplicate still in a stream or a batch would come later."""
    for stream, group in keys.consumer_groups():
        try:
            info: Any = await redis.xinfo_stream(stream)
            groups: Any = await redis.xinfo_groups(stream)
        except ResponseError:  # no such stream: nothing was ever added
            continue
        for found in groups:
            if found["name"].decode() != group:
                continue
            if found["pending"] or found["last-delivered-id"] != info["last-generated-id"]:
                return False
    due: Any = await redis.zrangebyscore(keys.timer, "-inf", time.time() * 1000, start=0, num=1)
    if due:
        return False
    return int(await db.fetchval(IN_FLIGHT)) == 0


async def wait_pipeline_idle(
    redis: Redis, db: asyncpg.Connection, keys: Keys, timeout: float = 15.0
) -> None:
    await wait_for(lambda: pipeline_idle(redis, db, keys), timeout=timeout, interval=0.05)
