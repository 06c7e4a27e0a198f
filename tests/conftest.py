"""Test fixtures: real PostgreSQL and Redis on free ports in temporary folders.

One PostgreSQL server per session holds a migrated template database; every test gets a fresh
database cloned from it (fast, and no test sees another's rows). One Redis server per session;
every test gets an empty logical database.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from playwright.async_api import Browser
from redis.asyncio import Redis

from notifyd.app import Daemon
from notifyd.settings import Settings
from notifyd.store import migrate
from scripts.localservers import PostgresServer, RedisServer
from tests.helpers import TEST_JWT_SECRET, Api, make_settings
from tests.smtp_sink import SmtpSink
from tests.ui_browser import HostSite, chromium

TEMPLATE_DB = "notifyd_template"
# Every session's cluster is a copy of one initdb made once (scripts/localservers.py); the
# promise mutants' scratch copies of the tree name the checkout's (scripts/mutants.py).
INITDB_CACHE = Path(
    os.environ.get("NOTIFYD_PG_INITDB_CACHE")
    or Path(__file__).resolve().parent.parent / ".local" / "pg-initdb"
)
_db_counter = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    # Not under pytest's basetemp: every pytest session resets /tmp/pytest-of-<user> to
    # 0700, and a second session started on the machine (a helper's, an editor's) cut the
    # postgres OS user off from this cluster's data mid-run (PANIC: pg_control: Permission
    # denied; every later test errored).
    base = Path(tempfile.mkdtemp(prefix="notifyd-test-pg-"))
    server = PostgresServer(base, fsync=False, initdb_cache=INITDB_CACHE)
    server.start()
    try:
        server.create_database(TEMPLATE_DB)

        async def apply() -> None:
            conn = await asyncpg.connect(server.dsn(TEMPLATE_DB))
            try:
                await migrate.apply(conn)
            finally:
                await conn.close()

        asyncio.run(apply())
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP and WebSocket client of the test's own, closed after it."""
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A real SMTP server on a free port, recording every message it accepts."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = f"test_{next(_db_counter)}"
    pg_server.create_database(name, template=TEMPLATE_DB)
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def empty_database_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database with no schema, for migration tests."""
    name = f"empty_{next(_db_counter)}"
    pg_server.create_database(name)
    try:
        yield pg_server.dsn(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    """Redis database 1, flushed: tests never see each other's streams."""
    url = redis_server.url(db=1)
    client = Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    return url


@pytest.fixture
def settings_factory(database_url: str, redis_url: str) -> Callable[..., Settings]:
    """Settings for a test daemon; keyword overrides use environment names."""

    def build(**env: str) -> Settings:
        return make_settings(database_url, redis_url, **env)

    return build


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def daemon_factory(settings_factory: Callable[..., Settings]) -> AsyncIterator[DaemonFactory]:
    """Start in-process daemons (each on its own free port); all are stopped at teardown."""
    started: list[Daemon] = []

    async def start(settings: Settings | None = None, **env: str) -> Daemon:
        daemon = Daemon(settings or settings_factory(**env))
        await daemon.start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        if daemon.supervisor is not None and not daemon.stopped:
            await daemon.stop()


@pytest.fixture
async def daemon(daemon_factory: DaemonFactory) -> Daemon:
    return await daemon_factory()


@pytest.fixture
async def api(daemon: Daemon) -> AsyncIterator[Api]:
    async with Api(daemon) as client:
        yield client


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """A client of the test Redis, to check what the daemon stored there."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to check what the daemon stored."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


__all__ = ["TEST_JWT_SECRET", "Path"]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of the test's own (persistent), for tests that kill or restart it."""
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def site() -> AsyncIterator[HostSite]:
    """The browser tests' host page, on another origin than the daemon's
    (`tests.ui_browser.start_daemon` lets it in)."""
    host = HostSite()
    await host.start()
    yield host
    await host.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for the browser tests (`tests.ui_browser.needs_chromium`)."""
    async with chromium() as launched:
        yield launched
